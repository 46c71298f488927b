"""Checks an mdopt-bench JSON result for the smoke tests: it parses, and every requested
preset has a row per engine with positive times and state bytes, the memory stream was
measured, and the traffic model gives the bytes worked out by hand (--model-bytes)."""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file", help="the JSON file, or - for stdin")
    ap.add_argument("--presets", required=True)
    ap.add_argument("--engines", default="fast")
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--tensors", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--reference-steps", type=int, default=1)
    ap.add_argument("--model-bytes", default="",
                    help="preset=BYTES,... : the fast rows' expected model_bytes")
    a = ap.parse_args()
    text = sys.stdin.read() if a.json_file == "-" else open(a.json_file).read()
    doc = json.loads(text)
    errors = []
    for key in ("cpu_model", "date_utc", "mdopt_version", "abi_version"):
        if key not in doc["machine"]:
            errors.append("machine has no " + key)
    for key in ("stream_inplace_gbps", "stream_triad_gbps"):
        v = doc["machine"].get(key)
        if not (isinstance(v, (int, float)) and v > 0):
            errors.append("machine %s = %r is not positive" % (key, v))
    want_bytes = dict((kv.split("=")[0], int(kv.split("=")[1]))
                      for kv in a.model_bytes.split(",") if kv)
    if doc["setup"]["params"] != a.params or doc["setup"]["tensors"] != a.tensors:
        errors.append("setup says %d params in %d tensors, expected %d in %d" % (
            doc["setup"]["params"], doc["setup"]["tensors"], a.params, a.tensors))
    rows = {(r["preset"], r["engine"]): r for r in doc["rows"]}
    engines = a.engines.split(",")
    presets = a.presets.split(",")
    if len(doc["rows"]) != len(presets) * len(engines):
        errors.append("%d rows, expected %d" % (len(doc["rows"]), len(presets) * len(engines)))
    for p in presets:
        for e in engines:
            r = rows.get((p, e))
            if r is None:
                errors.append("no row for %s/%s" % (p, e))
                continue
            where = "%s/%s: " % (p, e)
            steps = a.steps if e == "fast" else a.reference_steps
            if r["steps"] != steps or len(r["step_ms"]) != steps or len(r["wall_ms"]) != steps:
                errors.append(where + "expected %d timed steps" % steps)
            for key in ("median_ms", "mean_ms", "wall_median_ms", "wall_mean_ms",
                        "ns_per_param", "state_bytes", "state_bytes_per_param"):
                if not (isinstance(r[key], (int, float)) and r[key] > 0):
                    errors.append(where + "%s = %r is not positive" % (key, r[key]))
            if r["params"] != a.params:
                errors.append(where + "params %d, expected %d" % (r["params"], a.params))
            if r["workspace_bytes"] < 0:
                errors.append(where + "negative workspace_bytes")
            model = r["model_bytes"]
            if e == "fast":
                if not (isinstance(model, int) and model > 0):
                    errors.append(where + "model_bytes = %r" % (model,))
                elif p in want_bytes and model != want_bytes[p]:
                    errors.append(where + "model_bytes %d, expected %d" % (model, want_bytes[p]))
                if not (isinstance(r["achieved_gbps"], (int, float)) and r["achieved_gbps"] > 0):
                    errors.append(where + "achieved_gbps = %r" % (r["achieved_gbps"],))
            elif model is not None or r["achieved_gbps"] is not None:
                errors.append(where + "a reference row has model_bytes %r" % (model,))
            want_ratio = e == "fast" and "reference" in engines
            ratio = r["ratio_to_reference"]
            if want_ratio and not (isinstance(ratio, (int, float)) and ratio > 0):
                errors.append(where + "ratio_to_reference = %r" % (ratio,))
            if not want_ratio and ratio is not None:
                errors.append(where + "unexpected ratio_to_reference %r" % (ratio,))
    for e in errors:
        print("check_bench_json: " + e, file=sys.stderr)
    if errors:
        return 1
    print("check_bench_json: %d rows OK" % len(doc["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
