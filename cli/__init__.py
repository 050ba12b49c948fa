"""The click command line, installed as ``fpstore.cli``. Each module here is thin:
it parses, validates, and calls one library function; heavy imports happen inside
the commands so that ``fpstore --help`` stays fast."""
