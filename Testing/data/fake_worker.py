"""Stand-in for ``python -m vocoslicer serve --stdio`` in the worker-client tests: the same JSON-lines protocol
(one request per line -> event lines -> one ``result``/``error`` line with the request's id), no model.

Extra ops for the tests: ``crash`` (dies mid-request), ``garbage`` (prints non-protocol lines), ``spawn``
(starts a long-sleeping child, to check that closing the client ends the whole process group).
"""

import json
import os
import subprocess
import sys
import time


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            send({"id": None, "kind": "error", "message": "request is not JSON"})
            continue
        rid, op = req.get("id"), req.get("op")
        if op == "ping":
            send({"id": rid, "kind": "result", "pong": True, "pid": os.getpid()})
        elif op in ("segment", "classify"):
            steps = int(req.get("steps", 3))
            for i in range(1, steps + 1):
                time.sleep(float(req.get("sleep", 0.01)))
                event = {"t": time.time(), "kind": "progress", "step": i, "total": steps}
                if i % 2 == 0:
                    event["id"] = rid  # events may or may not carry the request id
                send(event)
            send({"id": rid, "kind": "result", "op": op, "output": req.get("output")})
        elif op == "crash":
            sys.stderr.write("fatal: simulated crash\n")
            sys.stderr.flush()
            os._exit(1)
        elif op == "garbage":
            sys.stdout.write("a library printing to stdout\n{\"kind\": broken\n")
            send({"id": rid, "kind": "result"})
        elif op == "spawn":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            send({"id": rid, "kind": "result", "child": child.pid})
        elif op == "shutdown":
            send({"id": rid, "kind": "result"})
            return
        else:
            send({"id": rid, "kind": "error", "message": f"unknown op {op!r}"})


if __name__ == "__main__":
    main()
