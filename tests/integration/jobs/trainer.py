"""The auto-resume tests' trainer: the drill's canary (hpresilience/drill/canary.py), run as a file."""
import sys

from hpresilience.drill.canary import main

if __name__ == "__main__":
    sys.exit(main())
