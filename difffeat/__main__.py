"""``python -m difffeat ...``: the same CLI as the ``difffeat`` script (and ``accelerate launch -m difffeat``)."""
from difffeat.cli import main

if __name__ == "__main__":
    main()
