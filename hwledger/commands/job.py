"""`hwledger job`: placeholder until its issue lands."""


def register(subparsers):
    parser = subparsers.add_parser("job", help="(not yet implemented)")
    parser.set_defaults(func=lambda args: parser.error("not implemented yet"))
