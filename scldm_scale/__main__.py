import sys

from scldm_scale.cli import main

if __name__ == "__main__":
    sys.exit(main())
