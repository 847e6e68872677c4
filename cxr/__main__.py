from cxr.cli import app

app(prog_name="cxr")
