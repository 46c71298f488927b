"""References to mdopt checkpoint directories (what MDOptimizer.state_dict and the Megatron
adapter's sharded_state_dict hold instead of the state itself).

mdopt_save writes one rank file per rank and, last, rank 0's manifest.json (docs/ABI.md,
"Checkpoints"). A reference names the directory and pins the save it was taken from: the
manifest's checksum and step, and one rank file's name, size and checksum. A later save
into the same directory replaces that save (mdopt_save removes the files of earlier saves),
and loading such a stale reference is refused rather than silently loading other state.

Only manifest.json is read here (a few KB per parameter); rank files are never opened in
Python: mdopt_load opens, on each rank, only the files holding rows that rank holds.
"""

import json
import os
import tempfile

FORMAT = "mdopt-checkpoint-ref"
VERSION = 1


def read_manifest(directory):
    path = os.path.join(directory, "manifest.json")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise ValueError("mdopt checkpoint '%s' has no manifest.json (not saved there, or "
                         "not visible from this node: the directory must be on a file system "
                         "every rank sees)" % directory) from None


def make(directory, rank):
    """The reference to the save mdopt_save just committed in `directory`, naming `rank`'s
    file (called on every rank after the collective save)."""
    m = read_manifest(directory)
    files = {int(f["rank"]): f for f in m["rank_files"]}
    mine = files[rank if rank in files else 0]
    return {"format": FORMAT, "version": VERSION, "directory": os.path.abspath(directory),
            "world_size": int(m["world_size"]), "step": int(m["step"]),
            "manifest_crc32c": m["crc32c"], "rank": int(mine["rank"]),
            "rank_file": {"name": mine["name"], "bytes": int(mine["bytes"]),
                          "crc32c": mine["crc32c"]}}


def is_ref(obj):
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def check(ref, directory=None):
    """None when `directory` (default: the reference's) holds the save the reference was
    taken from, else why not. Stats the named rank file; opens none."""
    if ref.get("version") != VERSION:
        return "checkpoint reference version %r; this package reads version %d" % (
            ref.get("version"), VERSION)
    d = directory or ref["directory"]
    try:
        m = read_manifest(d)
    except ValueError as e:
        return str(e)
    except (OSError, json.JSONDecodeError) as e:
        return "cannot read the manifest of '%s': %s" % (d, e)
    if m.get("crc32c") != ref["manifest_crc32c"] or int(m.get("step", -1)) != ref["step"]:
        return ("'%s' holds another save (step %s, manifest crc32c %s) than the one this "
                "state refers to (step %d, crc32c %s): a later save into the same directory "
                "replaced it" % (d, m.get("step"), m.get("crc32c"), ref["step"],
                                 ref["manifest_crc32c"]))
    rf = ref["rank_file"]
    named = [f for f in m.get("rank_files", []) if int(f["rank"]) == ref["rank"]]
    if not named or named[0]["name"] != rf["name"] or named[0]["crc32c"] != rf["crc32c"]:
        return "the manifest of '%s' does not name rank file %s" % (d, rf["name"])
    try:
        size = os.stat(os.path.join(d, rf["name"])).st_size
    except OSError as e:
        return "rank file '%s' of '%s': %s" % (rf["name"], d, e.strerror)
    if size != rf["bytes"]:
        return "rank file '%s' of '%s' holds %d bytes, the save wrote %d" % (
            rf["name"], d, size, rf["bytes"])
    return None


def shared_dir(explicit, world_size, who):
    """The directory a save on `world_size` ranks writes: `explicit`, else $MDOPT_STATE_DIR;
    None on one rank without either (the caller picks a private temporary). On several ranks
    there is no default: ranks on different nodes would each write into their own node-local
    temporary directory, and no rank could then read the rows the others wrote."""
    d = explicit if explicit is not None else os.environ.get("MDOPT_STATE_DIR") or None
    if d is None and world_size > 1:
        raise RuntimeError(
            "%s on %d ranks needs a checkpoint directory every rank sees (a shared file "
            "system): pass state_dir= or set MDOPT_STATE_DIR. There is no default: a "
            "node-local one such as %s would have the ranks of each node write their files "
            "to their own disk, and no rank could load the rows written on another node"
            % (who, world_size, tempfile.gettempdir()))
    return d
