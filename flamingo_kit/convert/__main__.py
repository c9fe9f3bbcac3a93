"""``python -m flamingo_kit.convert`` = ``flamingo-convert``."""

from flamingo_kit.convert.cli import main

if __name__ == "__main__":
    main()
