"""``difffeat explore``: an interactive browser app for diffusion features.

The app puts the library's methods behind one page, the way the field first meets them
(DIFT's click-a-point notebook, SD-DINO's co-PCA visualisations, the Spaces of EVP and
Marigold): correspondence by clicking, co-PCA RGB and k-means parts with a layer x t sweep,
the Diffusion Classifier, zero-shot or trained dense heads, and DIRE / AEROBLADE detection.

Layout (a top layer like the CLI; nothing below imports it):

* :mod:`.session`  models, extractors and the per-(image, settings) feature cache, guarded
  image inputs and the bundled shapes scenes;
* :mod:`.views`    one plain function per tab (images + text out, no browser needed);
* :mod:`.app`      the Gradio wiring (thin; Gradio is imported there only, from the
  ``difffeat[explore]`` extra);
* :mod:`.command`  the ``difffeat explore`` command.
"""
