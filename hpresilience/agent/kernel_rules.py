"""Kernel-log rules: which kernel messages are faults, and what each one asks for.

The rules are data: rules/kernel.toml (regex → code, action, message) and
NVIDIA's XID catalog (rules/nvidia-xid-catalog.csv), whose immediate actions
map to node actions through the [xid] tables of the same TOML file. This
module loads them, merges an admin file over them, validates the result
strictly, and classifies lines::

    >>> rules = load_rules()
    >>> f = rules.classify("Nov 22 11:20:21 n2 kernel: NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, "
    ...                    "name=<unknown>, NVLink: fatal error detected on link 6")
    >>> f.code, f.action.value, f.entity
    ('XID_74', 'replace', 'GPU (0000:b9:00.0)')
    >>> rules.classify("NVRM: Xid (PCI:0000:b9:00): 45, pid=1234, name=python, Ch 00000010").action.value
    'none'
    >>> rules.classify("systemd[1]: Started Session 4 of user root.") is None
    True

Merging: the admin file is laid over the shipped one key by key, rules matched
by name. An admin can switch a rule off (`enabled = false`), change any of its
keys, add rules, and change XID actions; there is no way to delete a shipped
rule by omission, which is the point (cyclecloud-healthagent's list-valued
config lost every default rule to a one-rule override).

Where a rule matches (issue 9, defect 1): at the start of the message only
(`re.match`, after the timestamp, host, "kernel:" and printk caller prefix are
stripped), where the subsystem writes its own prefix, and on the message with
every user-controlled field masked (kernel_line.mask_user_text: process, file
and cgroup names, mount options, quoted strings). A message that starts with a
user field (a segfault's or a trap's comm) is a process's, and no rule reads it.
So a process named `EDAC MC0: UE` whose segfault, OOM kill or hung task the
kernel reports never reads as a memory error, whoever wrote the rule. A rule that
spans into the rest of the line (`.*`) reads only what the masks left: text
the masks know of reads `<user>`; shipped rules span only bounded stretches of
their subsystem's own text.

Evaluation is pure and cheap: every pattern is compiled once, and a rule's
regex runs only on lines holding one of the literal strings any match of it
must contain (derived from the pattern itself, so an admin's rule gets the
same gate without declaring keywords).
"""
from __future__ import annotations

import csv
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

try:  # Python 3.11 moved the regex parser; both are internal, hence the guarded use below
    from re import _constants as _sre
    from re import _parser as _sre_parser
except ImportError:
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parser  # type: ignore[no-redef]

from ..config import ConfigError, read_toml
from ..finding import Finding, NodeAction
from .config import SLURM_STATES
from .kernel_line import USER_MASK, KernelLine, mask_user_text, parse_line
from .monitors.nvml import normalize_pci_bus_id

RULES_DIR = Path(__file__).parent / "rules"
SHIPPED_RULES = RULES_DIR / "kernel.toml"
XID_CATALOG = RULES_DIR / "nvidia-xid-catalog.csv"
MONITOR = "kernel_log"

RULE_KEYS = ("pattern", "code", "action", "message", "component", "entity", "action_from", "slurm_state",
             "enabled")
REQUIRED_KEYS = ("pattern", "code", "action", "message")
XID_TABLES = ("immediate_actions", "overrides", "recovery_actions")
# action_from → the named group whose value picks the action.
ACTION_SOURCES = {"xid": "xid", "xid_recovery": "recovery"}
# Template fields the engine derives → the named group they are derived from.
DERIVED_FIELDS = {"gpu": "pci", "mnemonic": "xid"}
UNKNOWN_MNEMONIC = "UNKNOWN"
# POSSESSIVE_REPEAT is new in 3.11.
_REPEATS = tuple(getattr(_sre, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre, op))

PciToGpu = Callable[[str], Optional[str]]


class RulesError(ValueError):
    """A rules file (or the XID catalog) that cannot be used.

    The message names the file, the rule and the key, so an admin can fix it
    without reading code: `/etc/hpresilience/rules.toml: rule "my_rule": pattern: ...`."""

    def __init__(self, path: Path, problem: str, rule: Optional[str] = None, key: Optional[str] = None):
        self.path = path
        self.rule = rule
        self.key = key
        self.problem = problem
        where = f'rule "{rule}": ' if rule is not None else ""
        what = f"{key}: " if key is not None else ""
        super().__init__(f"{path}: {where}{what}{problem}")


@dataclass(frozen=True)
class XidEntry:
    """One row of NVIDIA's XID catalog."""
    xid: int
    mnemonic: str
    immediate_action: str
    fatal: bool


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern
    code: str                          # template
    action: NodeAction                 # with action_from: for a key its table does not list
    message: str                       # template
    component: str = "node"
    entity: Optional[str] = None       # template; None = the whole node
    action_from: Optional[str] = None  # "xid" | "xid_recovery"
    slurm_state: Optional[str] = None
    enabled: bool = True


class _Fields(dict):
    """Template values; a field whose group did not take part renders empty, never raises."""

    def __missing__(self, key: str) -> str:
        return ""


class RuleSet:
    """The loaded rules and XID actions; `classify` turns one line into at most one Finding."""

    def __init__(self, rules: Sequence[Rule], xid_catalog: Mapping[int, XidEntry],
                 xid_actions: Mapping[int, NodeAction], recovery_actions: Mapping[str, NodeAction]):
        self.rules: Dict[str, Rule] = {r.name: r for r in rules}
        self.xid_catalog: Dict[int, XidEntry] = dict(xid_catalog)
        self.xid_actions: Dict[int, NodeAction] = dict(xid_actions)
        self.recovery_actions: Dict[str, NodeAction] = {_label(k): v for k, v in recovery_actions.items()}
        self._active = [r for r in rules if r.enabled]
        self._entity_fields = {r.name: _template_fields(r.entity) for r in rules if r.entity}
        # The gate: literal → the rules (by position) whose every match contains it; rules
        # without such a literal always run.
        self._ungated: Set[int] = set()
        self._by_literal: Dict[str, Set[int]] = {}
        for i, rule in enumerate(self._active):
            literals = _required_literals(rule.pattern)
            if literals is None:
                self._ungated.add(i)
            for literal in literals or ():
                self._by_literal.setdefault(literal, set()).add(i)
        self._literals = tuple(self._by_literal)

    def xid_action(self, xid: int) -> Optional[NodeAction]:
        """The action for `xid` (catalog and overrides), None for an XID nobody listed."""
        return self.xid_actions.get(xid)

    def classify(self, line: Union[str, bytes, KernelLine], pci_to_gpu: Optional[PciToGpu] = None
                 ) -> Optional[Finding]:
        """The finding for one kernel-log line, or None when no rule matches.

        `line` is a raw line in any form kernel_line.parse_line reads, or an already parsed
        KernelLine (whose wall time, the kernel's stamp, becomes the finding's observed_at; a line
        without one is stamped now). Rules match at the start of the message with user-controlled
        fields masked (issue 9, defect 1); the evidence is the message as logged. When several
        rules match, the most severe action wins, the first listed on a tie. `pci_to_gpu` maps a
        GPU's PCI id in sysfs form ("0000:b9:00.0") to its name, e.g. its index; the entity then
        reads "GPU 3 (0000:b9:00.0)", as the NVML monitor writes it, instead of "GPU (0000:b9:00.0)".
        Lines that a program other than the kernel wrote (per their syslog tag or /dev/kmsg
        facility) never match."""
        parsed = line if isinstance(line, KernelLine) else parse_line(line)
        if parsed is None or not parsed.from_kernel:
            return None
        text = mask_user_text(parsed.text)
        if text.startswith(USER_MASK):
            return None  # a process's line (issue 9, defect 1): whatever its name, no subsystem wrote it
        candidates = set(self._ungated)
        for literal in [s for s in self._literals if s in text]:
            candidates |= self._by_literal[literal]
        best: Optional[Tuple[Rule, NodeAction, re.Match]] = None
        for i in sorted(candidates):
            rule = self._active[i]
            match = rule.pattern.match(text)
            if match is None:
                continue
            action = self._action_of(rule, match.groupdict())
            if best is None or action.rank > best[1].rank:
                best = (rule, action, match)
        if best is None:
            return None
        rule, action, match = best
        fields = self._fields(match.groupdict(), pci_to_gpu)
        entity = None
        if rule.entity and all(fields[f] for f in self._entity_fields[rule.name]):
            entity = rule.entity.format_map(fields)
        return Finding(
            monitor=MONITOR,
            code=rule.code.format_map(fields),
            action=action,
            message=_render(rule.message, fields),
            component=rule.component,
            entity=entity,
            evidence=parsed.text,
            rule=rule.name,
            slurm_state=rule.slurm_state,
            observed_at=parsed.wall_time if parsed.wall_time is not None else time.time(),
        )

    def finding_for(self, code: str, entity: Optional[str] = None) -> Optional[Finding]:
        """The finding the enabled rules give for a fault `code` on `entity` without a kernel line:
        the rule, action, message, component and Slurm state a line of that fault gets, so a drill
        (issue 13) injects through the rules themselves and no second code → action table can drift
        from them. The rule's templates are read backwards for their fields ("XID_{xid}" and "XID_74":
        xid 74, whose action the catalog gives); a field neither `code` nor `entity` says renders empty,
        as in `classify`. With an entity, only a rule with an entity template it fits takes part.
        Several rules: the most severe action wins, the first listed on a tie. None when no rule gives it.

            >>> f = load_rules().finding_for("XID_74", "GPU 0")
            >>> f.action.value, f.message, f.entity
            ('replace', 'XID 74 NVLINK_ERROR on GPU 0', 'GPU 0')
        """
        best: Optional[Tuple[Rule, NodeAction, Dict[str, str]]] = None
        for rule in self._active:
            groups = _template_groups(rule.code, code)
            # Only a code a kernel line could give: "XID_074" or "XID_7_4" read as 74 otherwise, with a
            # key and a reason no real fault has (issue 13 review).
            if groups is None or not _canonical(groups) or _render(rule.code, groups) != code:
                continue
            if entity is not None:
                named = _template_groups(rule.entity, entity) if rule.entity else None
                if named is None:
                    continue
                groups = {**named, **groups}
            action = self._action_of(rule, groups)
            if best is None or action.rank > best[1].rank:
                best = (rule, action, groups)
        if best is None:
            return None
        rule, action, groups = best
        message = _render(rule.message, self._fields(groups, None))
        return Finding(monitor=MONITOR, code=code, action=action, message=message, component=rule.component,
                       entity=entity, rule=rule.name, slurm_state=rule.slurm_state)

    def _action_of(self, rule: Rule, groups: Mapping[str, Optional[str]]) -> NodeAction:
        if rule.action_from == "xid":
            xid = _to_int(groups.get("xid"))
            return self.xid_actions.get(xid, rule.action) if xid is not None else rule.action
        if rule.action_from == "xid_recovery":
            return self.recovery_actions.get(_label(groups.get("recovery") or ""), rule.action)
        return rule.action

    def _fields(self, groups: Mapping[str, Optional[str]], pci_to_gpu: Optional[PciToGpu]) -> _Fields:
        fields = _Fields((k, v) for k, v in groups.items() if v)
        if "pci" in fields:
            # One spelling of a GPU across monitors ("0000:b9:00.0", as NVML's monitor writes it),
            # so the same fault seen by both has the same Finding.key.
            try:
                fields["pci"] = normalize_pci_bus_id(fields["pci"])
            except ValueError:
                fields["pci"] = fields["pci"].lower()
            name = _gpu_name(pci_to_gpu, fields["pci"])
            fields["gpu"] = f"{name} ({fields['pci']})" if name else f"({fields['pci']})"
        if "xid" in fields:
            xid = _to_int(fields["xid"])
            entry = self.xid_catalog.get(xid) if xid is not None else None
            fields["mnemonic"] = entry.mnemonic if entry else UNKNOWN_MNEMONIC
        return fields


def _render(template: str, fields: _Fields) -> str:
    return " ".join(template.format_map(fields).split())


def _canonical(groups: Mapping[str, str]) -> bool:
    """An XID as the kernel prints it: decimal digits, no leading zero."""
    xid = groups.get("xid")
    return xid is None or re.fullmatch(r"[1-9][0-9]*", xid) is not None


def _template_groups(template: str, text: str) -> Optional[Dict[str, str]]:
    """The field values with which `template` renders as `text`, None when it cannot.

    >>> _template_groups("XID_{xid}", "XID_74"), _template_groups("HUNG_TASK", "XID_74")
    ({'xid': '74'}, None)
    """
    parts = []
    seen: Set[str] = set()
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:  # plain {name} fields only: _template_fields checked every template at load
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>.+?)")
            seen.add(name)
    match = re.fullmatch("".join(parts), text, re.DOTALL)
    return match.groupdict() if match else None


def _gpu_name(pci_to_gpu: Optional[PciToGpu], pci: str) -> Optional[str]:
    if pci_to_gpu is None:
        return None
    try:
        name = pci_to_gpu(pci)
    except Exception:  # the caller's lookup failing must not lose the finding
        return None
    return str(name) if name is not None and str(name) else None


def _to_int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text else None
    except ValueError:  # more digits than int() accepts
        return None


def _label(text: str) -> str:
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------- gate

def _required_literals(pattern: re.Pattern) -> Optional[Tuple[str, ...]]:
    """Strings one of which every match of `pattern` contains, None when none can be told.

    `literal in line` is a C-speed substring test: a line holding none of a rule's literals
    cannot match it, so its regex need not run. Python's regex engine has no literal-set
    search: one alternation of all the patterns measured no faster than running each."""
    if pattern.flags & re.IGNORECASE:
        return None
    try:
        literals = _literals_of(list(_sre_parser.parse(pattern.pattern, pattern.flags)))
    except Exception:  # the parser is internal to `re`: an unexpected shape only turns the gate off
        return None
    return tuple(sorted(literals)) if literals else None


def _literals_of(items: List[Tuple[Any, Any]]) -> Optional[Set[str]]:
    """For a sequence of parsed regex items that must all match: the most selective set of
    alternative literals one of which any match contains."""
    candidates: List[Set[str]] = []
    run: List[str] = []
    for op, av in items:
        if op is _sre.LITERAL:
            run.append(chr(av))
            continue
        if run:
            candidates.append({"".join(run)})
            run = []
        inner: Optional[Set[str]] = None
        if op is _sre.SUBPATTERN:
            _, add_flags, _, sub = av
            if not add_flags & _sre.SRE_FLAG_IGNORECASE:
                inner = _literals_of(list(sub))
        elif op is _sre.BRANCH:
            alternatives = [_literals_of(list(b)) for b in av[1]]
            if all(alternatives):
                inner = set().union(*alternatives)
        elif op in _REPEATS and av[0] >= 1:
            inner = _literals_of(list(av[2]))
        # Anything else (classes, anchors, assertions, optional parts) only ends a run.
        if inner:
            candidates.append(inner)
    if run:
        candidates.append({"".join(run)})
    return max(candidates, key=lambda c: min(map(len, c)), default=None)


# ------------------------------------------------------------------ loading

def load_rules(admin_file: Optional[Path] = None, *, catalog: Path = XID_CATALOG) -> RuleSet:
    """The shipped rules with `admin_file` (if given) deep-merged over them, validated.

    Raises RulesError naming the file, rule and key of the first problem found: unknown keys,
    missing required keys, a bad regex, action or template, an XID catalog row without an action."""
    layers = [(SHIPPED_RULES, _read_toml(SHIPPED_RULES))]
    if admin_file is not None:
        layers.append((Path(admin_file), _read_toml(Path(admin_file))))
    merged = _Merged()
    for path, doc in layers:
        merged.add(path, doc)
    return _build(merged, catalog)


def _read_toml(path: Path) -> Dict[str, Any]:
    try:
        return read_toml(path)
    except ConfigError as e:  # one reader for every TOML file; errors keep the rules' shape
        raise RulesError(path, e.problem) from None


class _Merged:
    """The layered documents, merged key by key, remembering which file set each key so that
    an error names the file to fix."""

    def __init__(self) -> None:
        self.layers: List[Path] = []
        self.rules: Dict[str, Dict[str, Any]] = {}
        self.rule_origin: Dict[str, Dict[str, Path]] = {}
        self.xid: Dict[str, Dict[str, Any]] = {t: {} for t in XID_TABLES}
        self.xid_origin: Dict[str, Dict[str, Path]] = {t: {} for t in XID_TABLES}

    def add(self, path: Path, doc: Dict[str, Any]) -> None:
        self.layers.append(path)
        for key in doc:
            if key not in ("rules", "xid"):
                raise RulesError(path, "unknown table: expected [rules.<name>] and [xid.<table>]", key=key)
        rules = _table(path, doc.get("rules", {}), "rules")
        for name, table in rules.items():
            table = _table(path, table, f"rules.{name}")
            self.rules.setdefault(name, {}).update(table)
            self.rule_origin.setdefault(name, {}).update(dict.fromkeys(table, path))
        xid = _table(path, doc.get("xid", {}), "xid")
        for name, table in xid.items():
            if name not in XID_TABLES:
                raise RulesError(path, f"unknown table: expected one of {', '.join(XID_TABLES)}", key=f"xid.{name}")
            table = _table(path, table, f"xid.{name}")
            self.xid[name].update(table)
            self.xid_origin[name].update(dict.fromkeys(table, path))

    def rule_file(self, name: str, *keys: str) -> Path:
        """The file to blame for a problem with `keys` of rule `name`: the last layer that set one
        of them, else the last layer that touched the rule."""
        origin = self.rule_origin[name]
        touched = [origin[k] for k in keys if k in origin] or list(origin.values())
        return max(touched, key=self.layers.index)


def _table(path: Path, value: Any, key: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise RulesError(path, f"expected a table, got {type(value).__name__}", key=key)
    return value


def _build(merged: _Merged, catalog_path: Path) -> RuleSet:
    rules = [_compile_rule(merged, name) for name in merged.rules]
    immediate = _action_table(merged, "immediate_actions")
    catalog = _read_catalog(catalog_path)
    used = {e.immediate_action for e in catalog.values()}
    for key in immediate:
        if key not in used:
            raise RulesError(merged.xid_origin["immediate_actions"][key],
                             f"not an immediate action of the XID catalog ({', '.join(sorted(used))})",
                             key=f"xid.immediate_actions.{key}")
    xid_actions: Dict[int, NodeAction] = {}
    for entry in catalog.values():
        if entry.immediate_action not in immediate:
            raise RulesError(catalog_path, f"immediate action {entry.immediate_action} has no entry in "
                             "[xid.immediate_actions]", key=f"XID {entry.xid}")
        xid_actions[entry.xid] = immediate[entry.immediate_action]
    for key, action in _action_table(merged, "overrides").items():
        xid = _to_int(key) if key.isdigit() else None
        if xid is None:
            raise RulesError(merged.xid_origin["overrides"][key], "not an XID number", key=f"xid.overrides.{key}")
        xid_actions[xid] = action
    recovery = _action_table(merged, "recovery_actions")
    return RuleSet(rules, catalog, xid_actions, recovery)


def _action_table(merged: _Merged, table: str) -> Dict[str, NodeAction]:
    actions = {}
    for key, value in merged.xid[table].items():
        path = merged.xid_origin[table][key]
        if not isinstance(value, str):
            raise RulesError(path, "expected an action: none, reboot or replace", key=f"xid.{table}.{key}")
        try:
            actions[key] = NodeAction.parse(value)
        except ValueError as e:
            raise RulesError(path, str(e), key=f"xid.{table}.{key}") from None
    return actions


def _read_catalog(path: Path) -> Dict[int, XidEntry]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as e:
        raise RulesError(path, f"cannot read the XID catalog: {e}") from None
    catalog: Dict[int, XidEntry] = {}
    for line, row in enumerate(rows, start=2):
        xid = _to_int((row.get("xid") or "").strip())
        action = (row.get("immediate_action") or "").strip()
        if xid is None or not action:
            raise RulesError(path, "expected columns xid, mnemonic, immediate_action, fatality", key=f"line {line}")
        catalog[xid] = XidEntry(xid, (row.get("mnemonic") or "").strip(), action,
                                (row.get("fatality") or "").strip().upper() == "FATAL")
    return catalog


def _compile_rule(merged: _Merged, name: str) -> Rule:
    table = merged.rules[name]

    def error(problem: str, key: str, *blame: str) -> RulesError:
        return RulesError(merged.rule_file(name, key, *blame), problem, rule=name, key=key)

    for key in table:
        if key not in RULE_KEYS:
            raise error(f"unknown key (expected {', '.join(RULE_KEYS)})", key)
    for key in REQUIRED_KEYS:
        if key not in table:
            raise error("missing: every rule needs " + ", ".join(REQUIRED_KEYS), key)
    for key in RULE_KEYS:
        expected = bool if key == "enabled" else str
        if key in table and not isinstance(table[key], expected):
            raise error(f"expected a {'boolean' if expected is bool else 'string'}, "
                        f"got {type(table[key]).__name__}", key)

    try:
        pattern = re.compile(table["pattern"])
    except re.error as e:
        raise error(str(e), "pattern") from None
    if pattern.search("") is not None:
        raise error("matches an empty message, so it would match every line", "pattern")
    groups = set(pattern.groupindex)
    for derived in DERIVED_FIELDS:
        if derived in groups:
            raise error(f"the group name {derived!r} is reserved for the derived template field", "pattern")

    try:
        action = NodeAction.parse(table["action"])
    except ValueError as e:
        raise error(str(e), "action") from None
    action_from = table.get("action_from")
    if action_from is not None:
        if action_from not in ACTION_SOURCES:
            raise error(f"expected one of {', '.join(ACTION_SOURCES)}", "action_from")
        if ACTION_SOURCES[action_from] not in groups:
            raise error(f"needs a (?P<{ACTION_SOURCES[action_from]}>...) group in pattern", "action_from",
                        "pattern")
    slurm_state = table.get("slurm_state")
    if slurm_state is not None and slurm_state not in SLURM_STATES:
        raise error(f"expected one of {', '.join(SLURM_STATES)}", "slurm_state")
    component = table.get("component", "node").strip()
    if not component:
        raise error("must not be empty", "component")

    available = groups | {f for f, group in DERIVED_FIELDS.items() if group in groups}
    for key in ("code", "message", "entity"):
        if key not in table:
            continue
        try:
            fields = _template_fields(table[key])
        except ValueError as e:
            raise error(f"not a valid template: {e}", key) from None
        for f in fields:
            if f in DERIVED_FIELDS and f not in available:
                raise error(f"{{{f}}} needs a (?P<{DERIVED_FIELDS[f]}>...) group in pattern", key, "pattern")
            if f not in available:
                raise error(f"{{{f}}} is neither a named group of pattern nor a derived field "
                            f"({', '.join(DERIVED_FIELDS)})", key, "pattern")
    literal_code = re.sub(r"\{[^{}]*\}", "", table["code"])
    if not table["code"].strip() or not re.fullmatch(r"[A-Z0-9_]*", literal_code):
        raise error("use upper-case letters, digits and _ (and {group} fields): codes are stable keys", "code")
    if not table["message"].strip():
        raise error("must not be empty", "message")

    return Rule(name=name, pattern=pattern, code=table["code"], action=action, message=table["message"],
                component=component, entity=table.get("entity") or None, action_from=action_from,
                slurm_state=slurm_state, enabled=table.get("enabled", True))


def _template_fields(template: str) -> List[str]:
    """The field names of a str.format template, allowing only plain `{name}` fields: attribute
    access, indexing, conversions and format specs have no use here and could fail at runtime."""
    fields = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}: "
                             "only plain {name} fields are allowed")
        fields.append(field)
    return fields
