"""Deep health checks (issue 10): active tests that keep a bad node out of service.

Passive monitoring (the agent, `hpresilience check`) sees a fault once it shows;
a GPU whose HBM fails only under load, a slow NVLink or a GPU that computes wrong
results shows nothing until a job runs on it. These checks load the node on
purpose. They run after every repair (the controller's gate), for new nodes, and
between jobs (slurm_plugins/ prolog/epilog), never on a node carrying jobs.

- `result`: PASS / FAIL / SKIP / ERROR per check, the suite's report and exit code.
- `check`: the one interface (collect apart from evaluate) and its exceptions.
- `tool`: running an outside tool with a timeout (a hung tool is ERROR, never FAIL).
- `config`: levels, required checks, parameters as data keyed by name, per
  partition or node feature.
- `suite`: runs the checks of a level on this node.
- `checks/`: one small module per check; `parsers/`: the tools' outputs.
"""
