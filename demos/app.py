"""The vlmplug demo as a script: `python demos/app.py [--model ID_OR_PATH] [--port N] [--share]`.

The same app as `vlmplug demo` (vlmplug/demo/app.py); needs `pip install 'vlmplug[demo]'`.
"""
import sys

from vlmplug.demo.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
