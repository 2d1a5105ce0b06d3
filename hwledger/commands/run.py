"""`hwledger run`: placeholder until its issue lands."""


def register(subparsers):
    parser = subparsers.add_parser("run", help="(not yet implemented)")
    parser.set_defaults(func=lambda args: parser.error("not implemented yet"))
