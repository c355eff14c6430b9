"""A stand-in for `gcloud` in tests: it records its argv and plays back scripted answers.

Each call appends its argv (a JSON list, "gcloud" first) to $FAKE_GCLOUD_LOG. $FAKE_GCLOUD_SCRIPT names a JSON
list of rules `{"match": [words...], "answers": [{"rc": 0, "stdout": "...", "stderr": "..."}, ...]}`: the first
rule whose words all occur in the argv answers with its next answer (the last one repeats). No rule: exit 0.
"""
import json
import os
import sys

argv = ["gcloud", *sys.argv[1:]]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(json.dumps(argv) + "\n")
script = os.environ["FAKE_GCLOUD_SCRIPT"]
with open(script) as f:
  rules = json.load(f)
used_path = script + ".used"
used = json.load(open(used_path)) if os.path.exists(used_path) else {}
for i, rule in enumerate(rules):
  if all(any(word in arg for arg in argv) for word in rule["match"]):
    n = used.get(str(i), 0)
    used[str(i)] = n + 1
    with open(used_path, "w") as f:
      json.dump(used, f)
    answer = rule["answers"][min(n, len(rule["answers"]) - 1)]
    sys.stdout.write(answer.get("stdout", ""))
    sys.stderr.write(answer.get("stderr", ""))
    sys.exit(answer.get("rc", 0))
