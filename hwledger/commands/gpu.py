"""`hwledger gpu`: placeholder until its issue lands."""


def register(subparsers):
    parser = subparsers.add_parser("gpu", help="(not yet implemented)")
    parser.set_defaults(func=lambda args: parser.error("not implemented yet"))
