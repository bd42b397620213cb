"""``python -m difffeat.cli ...``: the same CLI as the ``difffeat`` script."""
from difffeat.cli import main

if __name__ == "__main__":
    main()
