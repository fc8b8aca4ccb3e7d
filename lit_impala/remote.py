"""``python -m lit_impala.remote ...``: serve as a remote actor node (the code is in ``actors.node``)."""

from lit_impala.actors.node import main

if __name__ == "__main__":
    main()
