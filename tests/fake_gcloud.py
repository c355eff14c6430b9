"""A strict stand-in for `gcloud` in tests: a scripted state machine of TPU VMs, queued resources, jobs and GCS.

It accepts only the commands and flags the launcher uses, with gcloud's documented names (anything else exits 2
with gcloud's "unrecognized arguments" error), and plays a scenario on a fake clock that only the launcher's
sleeps advance: nodes are CREATING for `create_s` then READY/HEALTHY; direct creation is refused for lack of
capacity until `capacity_from` (and, for an accelerator type in `sold_out`, from that time on), while a queued
resource waits (WAITING_FOR_RESOURCES) until then, or FAILS as
`queued_outcomes` say; `events` preempt a node, change its health or state at given times; each started job
follows the next entry of `jobs[name]` (run for runs_s, then finish, writing objects, or crash, or end with an
`error: ...` line); `ssh_down` windows make ssh fail on the nodes that existed when they opened.
In-process: `FakeCloud().execute(argv)`; as an executable: state in $FAKE_GCLOUD_STATE.
"""
from __future__ import annotations

import base64
import fnmatch
import json
import os
import re
import sys
from types import SimpleNamespace

WHERE = {"--zone": True, "--project": True}
COMMANDS = {   # command words → ({flag: takes a value}, positionals, required flags)
    ("compute", "tpus", "tpu-vm", "create"): ({**WHERE, "--accelerator-type": True, "--version": True, "--spot": False,
                                              "--reserved": False, "--metadata-from-file": True}, 1,
                                             ("--zone", "--accelerator-type", "--version")),
    ("compute", "tpus", "tpu-vm", "describe"): ({**WHERE, "--format": True}, 1, ("--zone",)),
    ("compute", "tpus", "tpu-vm", "delete"): ({**WHERE, "--quiet": False, "--async": False}, 1, ("--zone",)),
    ("compute", "tpus", "tpu-vm", "ssh"): ({**WHERE, "--worker": True, "--command": True, "--quiet": False}, 1,
                                          ("--zone",)),
    ("compute", "tpus", "queued-resources", "create"): (
        {**WHERE, "--node-id": True, "--node-count": True, "--node-prefix": True, "--accelerator-type": True,
         "--runtime-version": True, "--spot": False, "--reserved": False, "--best-effort": False,
         "--valid-until-duration": True, "--metadata-from-file": True}, 1,
        ("--zone", "--accelerator-type", "--runtime-version")),
    ("compute", "tpus", "queued-resources", "describe"): ({**WHERE, "--format": True}, 1, ("--zone",)),
    ("compute", "tpus", "queued-resources", "delete"): ({**WHERE, "--force": False, "--quiet": False}, 1, ("--zone",)),
    ("compute", "tpus", "queued-resources", "ssh"): ({**WHERE, "--node": True, "--worker": True, "--command": True,
                                                     "--quiet": False}, 1, ("--zone",)),
    ("compute", "tpus", "accelerator-types", "describe"): ({**WHERE, "--format": True}, 1, ("--zone",)),
    ("projects", "describe"): ({"--format": True}, 1, ()),
    ("storage", "ls"): ({}, 1, ()),
    ("storage", "cp"): ({}, 2, ()),
    ("storage", "cat"): ({}, 1, ()),
    ("storage", "rm"): ({}, 1, ()),
}
NODE_FORMAT = "json(state,health,healthDescription)"
DEFAULTS = {"create_s": 120, "capacity_from": 0, "sold_out": {}, "queued_outcomes": [], "events": [], "jobs": {},
            "answers": [], "project": "proj", "zones": {"us-central2-b": ["v4-8", "v4-16", "v4-32", "v4-64", "v4-128"]},
            "ssh_down": []}


def result(rc=0, stdout="", stderr=""):
  return SimpleNamespace(returncode=rc, stdout=stdout, stderr=stderr)


class FakeCloud:
  def __init__(self, scenario: dict | None = None, state: dict | None = None):
    self.state = state or {"clock": 0.0, "nodes": {}, "queued": {}, "objects": {}, "calls": [], "applied": [],
                           "answered": {}, "scenario": {**DEFAULTS, **(scenario or {})}}

  # The test's side -------------------------------------------------------------------------------------------
  @property
  def scenario(self):
    return self.state["scenario"]

  def now(self) -> float:
    return self.state["clock"]

  def sleep(self, seconds: float) -> None:
    self.state["clock"] += seconds

  def calls(self, *words) -> list[list[str]]:
    return [c for c in self.state["calls"] if all(any(w in a for a in c) for w in words)]

  # gcloud's side -----------------------------------------------------------------------------------------------
  def execute(self, argv):
    argv = list(argv)
    self.state["calls"].append(argv)
    answer = self._execute(argv)
    if answer.returncode == 2:            # a command line gcloud would refuse: the tests assert there are none
      self.state.setdefault("refused", []).append(argv)
    return answer

  def _execute(self, argv):
    words = argv[1:]
    if words and words[0] == "alpha":
      words = words[1:]
    command = next((c for c in COMMANDS if tuple(words[:len(c)]) == c), None)
    if command is None:
      return result(2, stderr=f"ERROR: (gcloud) Invalid choice: {' '.join(words[:4])!r}.\n")
    allowed, positionals, required = COMMANDS[command]
    flags, args = {}, []
    for word in words[len(command):]:
      if word.startswith("--"):
        name, eq, value = word.partition("=")
        if name not in allowed or allowed[name] != bool(eq):
          return result(2, stderr=f"ERROR: (gcloud.{'.'.join(command)}) unrecognized arguments: {word}\n")
        flags[name] = value if eq else True
      else:
        args.append(word)
    if len(args) != positionals:
      return result(2, stderr=f"ERROR: (gcloud.{'.'.join(command)}) wrong arguments: {args}\n")
    missing = [r for r in required if r not in flags]
    if missing:
      return result(2, stderr=f"ERROR: (gcloud.{'.'.join(command)}) argument {missing[0]}: Must be specified.\n")
    self.state["clock"] += self.scenario.get("tick_s", 0)
    self.advance()
    for i, rule in enumerate(self.scenario["answers"]):
      if all(any(w in a for a in argv) for w in rule["match"]):
        n = self.state["answered"].get(str(i), 0)
        if n < len(rule["answers"]):
          self.state["answered"][str(i)] = n + 1
          a = rule["answers"][n]
          return result(a.get("rc", 0), a.get("stdout", ""), a.get("stderr", ""))
    handler = getattr(self, "_" + "_".join(w.replace("-", "_") for w in command[-2:]))
    return handler(args, flags)

  def advance(self) -> None:
    """Apply what the fake clock says has happened: creations finishing, queued resources, events, jobs."""
    now, sc = self.now(), self.scenario
    for name, qr in list(self.state["queued"].items()):
      if qr["state"] in ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"):
        outcome = qr["outcome"]
        if outcome.get("fail_after") is not None:
          if now >= qr["created"] + outcome["fail_after"]:
            qr.update(state="FAILED", error=outcome["error"])
          else:
            qr["state"] = "WAITING_FOR_RESOURCES"
        elif (qr.get("valid_s") is not None and now >= qr["created"] + qr["valid_s"]
              and not self.has_capacity(qr["accelerator"])):
          qr.update(state="FAILED", error="Queued resource request expired: the requested capacity was not "
                                          "available before its valid-until time.")
        elif now >= qr["created"] and self.has_capacity(qr["accelerator"]):
          qr["state"] = "ACTIVE"
          for node in qr["nodes"]:
            self._new_node(node, qr["accelerator"], qr["script"], queued=name)
        else:
          qr["state"] = "WAITING_FOR_RESOURCES"
    for node in self.state["nodes"].values():
      if node["state"] == "CREATING" and now >= node["created"] + sc["create_s"]:
        node.update(state="READY", health="HEALTHY", boots=node["boots"] + 1)
    for i, event in enumerate(sc["events"]):
      if i in self.state["applied"] or now < event["at"]:
        continue
      self.state["applied"].append(i)
      node = self.state["nodes"].get(event["node"])
      if node is None:
        continue
      if event.get("preempt"):
        if node["state"] != "READY":
          continue
        node.update(state="PREEMPTED", health="", jobs={})
        if node["queued"]:
          self.state["queued"][node["queued"]]["state"] = "SUSPENDED"
      if "health" in event:
        node["health"] = event["health"]
        node["healthDescription"] = event.get("description", "")
      if "state" in event:
        node["state"] = event["state"]
    for node in self.state["nodes"].values():
      for job in node["jobs"].values():
        if job["status"] == "ALIVE" and now >= job["start"] + job["runs_s"]:
          job["status"] = "DEAD"
          if job["then"] == "finish":
            for url in job.get("writes", []):
              self.state["objects"][url] = "done\n"
          if job["then"] == "error":
            job["log"].append(f"error: {job['error']}")

  def has_capacity(self, accelerator: str) -> bool:
    now = self.now()
    return self.scenario["capacity_from"] <= now < self.scenario["sold_out"].get(accelerator, float("inf"))

  def _new_node(self, name, accelerator, script, queued=None):
    self.state["nodes"][name] = {"state": "CREATING", "health": "", "healthDescription": "", "created": self.now(),
                                 "accelerator": accelerator, "startup_script": script, "queued": queued,
                                 "boots": 0, "jobs": {}, "setups": [], "starts": []}

  # compute tpus tpu-vm ---------------------------------------------------------------------------------------------
  def _script(self, flags):
    value = flags.get("--metadata-from-file")
    if value is None:
      return None
    key, _, path = value.partition("=")
    assert key == "startup-script", value
    with open(path) as f:
      return f.read()

  def _tpu_vm_create(self, args, flags):
    name = args[0]
    if name in self.state["nodes"]:
      return result(1, stderr=f"ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: node {name}\n")
    if not self.has_capacity(flags["--accelerator-type"]):
      return result(1, stderr="ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: There is no more "
                              f"capacity in the zone \"{flags['--zone']}\"; you can try in another zone.\n")
    self._new_node(name, flags["--accelerator-type"], self._script(flags))
    return result(0, stderr=f"Create request issued for: [{name}]\n")

  def _tpu_vm_describe(self, args, flags):
    assert flags.get("--format") == NODE_FORMAT, flags
    node = self.state["nodes"].get(args[0])
    if node is None:
      return result(1, stderr=f"ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: {args[0]} not found\n")
    shown = {"state": node["state"]}
    if node["health"]:
      shown["health"] = node["health"]
    if node["healthDescription"]:
      shown["healthDescription"] = node["healthDescription"]
    return result(0, json.dumps(shown, indent=2) + "\n")

  def _tpu_vm_delete(self, args, flags):
    node = self.state["nodes"].get(args[0])
    if node is None:
      return result(1, stderr=f"ERROR: (gcloud.compute.tpus.tpu-vm.delete) NOT_FOUND: {args[0]} not found\n")
    if node["queued"]:
      return result(1, stderr="ERROR: (gcloud.compute.tpus.tpu-vm.delete) FAILED_PRECONDITION: the node belongs to "
                              "a queued resource\n")
    del self.state["nodes"][args[0]]
    return result(0)

  def _tpu_vm_ssh(self, args, flags):
    return self._ssh([args[0]], flags)

  def _ssh(self, names, flags):
    if flags.get("--worker") != "all":
      return result(2, stderr="ERROR: the launcher always runs on --worker=all\n")
    for name in names:
      node = self.state["nodes"].get(name)
      if node is None or node["state"] != "READY":
        return result(255, stderr="ssh: connect to host 10.0.0.2 port 22: Connection timed out\n")
      for window in self.scenario["ssh_down"]:
        if window["from"] <= self.now() < window["until"] and node["created"] <= window["from"]:
          return result(255, stderr=window.get("stderr", "ssh: connect to host 10.0.0.2 port 22: Connection "
                                                         "refused\n"))
    command = flags["--command"]
    out = []
    for name in names:
      node = self.state["nodes"][name]
      hosts = [f"{name}-w-{i}" for i in range(int(node["accelerator"].split("-")[1]) // 8)]
      if "tokenformer-setup.sh" in command:
        encoded = re.search(r"echo (\S+) \| base64 -d", command).group(1)
        node["setups"].append(base64.b64decode(encoded).decode())
        if self.scenario.get("setup_error"):
          return result(1, "".join(f"tokenformer setup FAILED on {h}: {self.scenario['setup_error']}\n"
                                   for h in hosts))
        out += [f"tokenformer setup done on {h}" for h in hosts]
      elif "nohup" in command:
        job = re.search(r"tokenformer-logs/([^ ]+)\.pid", command).group(1)
        plans = self.scenario["jobs"].get(job, [])
        started = self.state.setdefault("started", {})
        used = started.get(job, 0)
        started[job] = used + 1
        plan = plans[min(used, len(plans) - 1)] if plans else {"runs_s": float("inf"), "then": "crash"}
        node["starts"].append(job)
        node["jobs"][job] = {**plan, "status": "ALIVE", "start": self.now(), "log": [], "command": command}
      elif "ALIVE" in command:
        job = re.search(r'then echo "(\S+) ALIVE', command).group(1)
        status = node["jobs"].get(job, {}).get("status", "DEAD")
        out += [f"{job} {status} on {h}" for h in hosts]
      elif command.startswith("tail -n"):
        job = re.search(r"tokenformer-logs/(\S+)\.\*\.log", command).group(1)
        out += node["jobs"].get(job, {}).get("log", [])
    return result(0, "".join(line + "\n" for line in out))

  # compute tpus queued-resources -----------------------------------------------------------------------------------
  def _queued_resources_create(self, args, flags):
    name = args[0]
    if name in self.state["queued"]:
      return result(1, stderr=f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: {name}\n")
    if ("--node-id" in flags) == ("--node-count" in flags) or ("--node-count" in flags) != ("--node-prefix" in flags):
      return result(2, stderr="ERROR: give exactly one of --node-id or --node-count with --node-prefix\n")
    nodes = ([flags["--node-id"]] if "--node-id" in flags
             else [f"{flags['--node-prefix']}-{i}" for i in range(int(flags["--node-count"]))])
    outcomes = self.scenario["queued_outcomes"]
    made = self.state.setdefault("queued_made", 0)
    self.state["queued_made"] = made + 1
    valid = flags.get("--valid-until-duration")
    valid_s = None if valid is None else int(valid[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[valid[-1]]
    self.state["queued"][name] = {"state": "ACCEPTED", "created": self.now(), "nodes": nodes, "error": "",
                                  "accelerator": flags["--accelerator-type"], "script": self._script(flags),
                                  "outcome": outcomes[made] if made < len(outcomes) else {}, "valid_s": valid_s,
                                  "spot": "--spot" in flags}
    return result(0, stderr=f"Create request issued for: [{name}]\n")

  def _queued_resources_describe(self, args, flags):
    assert flags.get("--format") == "json(state)", flags
    qr = self.state["queued"].get(args[0])
    if qr is None:
      return result(1, stderr=f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: {args[0]}\n")
    state = {"state": qr["state"]}
    if qr["state"] == "FAILED":
      state["failedData"] = {"error": {"code": 9, "message": qr["error"]}}
    return result(0, json.dumps({"state": state}, indent=2) + "\n")

  def _queued_resources_delete(self, args, flags):
    qr = self.state["queued"].get(args[0])
    if qr is None:
      return result(1, stderr=f"ERROR: (gcloud.compute.tpus.queued-resources.delete) NOT_FOUND: {args[0]}\n")
    alive = [n for n in qr["nodes"] if n in self.state["nodes"]]
    if alive and "--force" not in flags:
      return result(1, stderr="ERROR: (gcloud.compute.tpus.queued-resources.delete) FAILED_PRECONDITION: the "
                              "queued resource has nodes; use --force\n")
    for node in alive:
      del self.state["nodes"][node]
    del self.state["queued"][args[0]]
    return result(0)

  def _queued_resources_ssh(self, args, flags):
    qr = self.state["queued"].get(args[0])
    if qr is None or flags.get("--node") != "all":
      return result(1, stderr="ERROR: (gcloud.compute.tpus.queued-resources.ssh) NOT_FOUND or not --node=all\n")
    return self._ssh(qr["nodes"], flags)

  def _accelerator_types_describe(self, args, flags):
    if args[0] not in self.scenario["zones"].get(flags["--zone"], []) or flags.get("--project") != \
        self.scenario["project"]:
      return result(1, stderr=f"ERROR: (gcloud.compute.tpus.accelerator-types.describe) NOT_FOUND: {args[0]} in "
                              f"{flags['--zone']}\n")
    return result(0, args[0] + "\n")

  def _projects_describe(self, args, flags):
    if args[0] != self.scenario["project"]:
      return result(1, stderr=f"ERROR: (gcloud.projects.describe) [{args[0]}] not found or permission denied\n")
    return result(0, args[0] + "\n")

  # storage -------------------------------------------------------------------------------------------------------
  def _storage_ls(self, args, flags):
    url = args[0].rstrip("/")
    found = sorted(u for u in self.state["objects"] if fnmatch.fnmatchcase(u, url) or u.startswith(url + "/"))
    if not found:
      return result(1, stderr="ERROR: (gcloud.storage.ls) One or more URLs matched no objects.\n")
    return result(0, "".join(u + "\n" for u in found))

  def _storage_cp(self, args, flags):
    source, destination = args
    if source.startswith("gs://"):
      if source not in self.state["objects"]:
        return result(1, stderr="ERROR: (gcloud.storage.cp) The following URLs matched no objects or files\n")
      with open(destination, "w") as f:
        f.write(self.state["objects"][source])
    else:
      with open(source, "rb") as f:
        data = f.read()
      self.state["objects"][destination] = data.decode(errors="replace")
    return result(0)

  def _storage_cat(self, args, flags):
    if args[0] not in self.state["objects"]:
      return result(1, stderr="ERROR: (gcloud.storage.cat) One or more URLs matched no objects.\n")
    return result(0, self.state["objects"][args[0]])

  def _storage_rm(self, args, flags):
    if self.state["objects"].pop(args[0], None) is None:
      return result(1, stderr="ERROR: (gcloud.storage.rm) One or more URLs matched no objects.\n")
    return result(0)


def main() -> None:
  path = os.environ["FAKE_GCLOUD_STATE"]
  with open(path) as f:
    cloud = FakeCloud(state=json.load(f))
  answer = cloud.execute(["gcloud", *sys.argv[1:]])
  with open(path, "w") as f:
    json.dump(cloud.state, f)
  sys.stdout.write(answer.stdout)
  sys.stderr.write(answer.stderr)
  sys.exit(answer.returncode)


if __name__ == "__main__":
  main()
