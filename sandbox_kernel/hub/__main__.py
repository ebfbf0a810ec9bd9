"""``python -m sandbox_kernel.hub``: run the sandbox service (see service.py)."""

from .service import main

if __name__ == "__main__":
    main()
