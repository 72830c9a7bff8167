"""python -m server [--model DIR] [--device auto|cpu|cuda] [--port 8000] ...  (see --help)"""

from .app import run
from .settings import parse_args


def main() -> None:
    run(parse_args())


if __name__ == "__main__":
    main()
