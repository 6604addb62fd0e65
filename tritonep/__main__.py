import sys

from .moe_demo import main

if __name__ == "__main__":
    sys.exit(main())
