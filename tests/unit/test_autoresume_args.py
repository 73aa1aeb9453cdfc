"""srun command-line handling of the auto-resume shim, settings and attempt state."""
from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpresilience.autoresume.allocation import why_bad
from hpresilience.autoresume.settings import load_settings
from hpresilience.autoresume.shim import find_real_srun
from hpresilience.autoresume.srun_args import UsageError, parse
from hpresilience.autoresume.srun_options import FLAG, OPTIONAL, OPTIONS, VALUE
from hpresilience.autoresume.state import AttemptState
from hpresilience.config import ConfigError
from hpresilience.slurm import Node


@pytest.mark.parametrize("argv, flag, program", [
    (["--auto-resume=1", "-N2", "python", "t.py"], True, ["python", "t.py"]),
    (["--auto-resume", "python", "t.py"], True, ["python", "t.py"]),
    (["--auto-resume=0", "python"], False, ["python"]),
    (["-N", "2", "train.sh", "--auto-resume=1"], None, ["train.sh", "--auto-resume=1"]),
    (["--nodes", "2", "--auto-resume=1", "--", "-weird-name"], True, ["-weird-name"]),
    (["-lK", "-w", "n[1-2]", "--auto-resume=7", "hostname"], True, ["hostname"]),
])
def test_flag_only_before_the_program_is_ours(argv, flag, program):
    cmd = parse(argv)
    assert cmd.auto_resume is flag
    assert cmd.program == program


@pytest.mark.parametrize("bad", ["--auto-resume=abc", "--auto-resume=", "--auto-resume=-1"])
def test_bad_auto_resume_values_are_usage_errors(bad):
    with pytest.raises(UsageError, match="--auto-resume"):
        parse([bad, "hostname"])


def test_retry_replaces_node_selection_and_keeps_everything_else():
    cmd = parse(["--auto-resume=1", "-N", "3", "-w", "n[1-3]", "--exclude=n9", "-l", "--ntasks-per-node=1",
                 "-J", "train", "python", "t.py", "-N", "5"])
    assert cmd.nodes == 3
    assert cmd.argv(["n1", "n4"]) == ["-l", "--ntasks-per-node=1", "-Jtrain", "--nodes=2", "--nodelist=n[1,4]",
                                      "python", "t.py", "-N", "5"]
    assert cmd.argv() == ["-N3", "-wn[1-3]", "--exclude=n9", "-l", "--ntasks-per-node=1", "-Jtrain", "python",
                          "t.py", "-N", "5"]


def test_missing_option_value_is_an_error():
    with pytest.raises(UsageError, match="-N needs a value"):
        parse(["--auto-resume", "-N"])


def test_without_our_flag_a_bad_srun_line_is_left_for_srun_to_reject():
    # issue 11: the shim must exec srun with argv untouched when --auto-resume is absent.
    cmd = parse(["-l", "-N"])
    assert cmd.options == [("-l", None), ("-N", None)] and cmd.auto_resume is None


@pytest.mark.parametrize("argv, options", [
    # issue 11: optional-value options took `--auto-resume=1` (or the program) as their value.
    (["--kill-on-bad-exit", "--auto-resume=1", "python", "t.py"], [("--kill-on-bad-exit", None)]),
    (["--bcast", "--resv-ports", "--auto-resume", "python"], [("--bcast", None), ("--resv-ports", None)]),
    (["-K", "--auto-resume", "python"], [("-K", None)]),
    (["-K1", "--exclusive=user", "--auto-resume", "python"], [("-K", "1"), ("--exclusive", "user")]),
    (["-lN2", "--auto-resume", "python"], [("-l", None), ("-N", "2")]),
    (["-Kl", "--auto-resume", "python"], [("-K", "l")]),            # getopt: an attached optional value
    (["--kill=0", "--nodel", "n1", "--auto-resume", "python"], [("--kill", "0"), ("--nodel", "n1")]),
])
def test_optional_values_never_take_the_next_word(argv, options):
    cmd = parse(argv)
    assert (cmd.options, cmd.auto_resume, cmd.program[0]) == (options, True, "python")


def test_a_required_value_may_look_like_our_flag():
    cmd = parse(["-J", "--auto-resume", "--comment", "--auto-resume=1", "python"])
    assert cmd.auto_resume is None and cmd.value("--job-name") == "--auto-resume"


@pytest.mark.parametrize("argv, flag", [
    (["--auto-resume", "--auto-resume=0", "hostname"], False),
    (["--auto-resume=0", "--auto-resume", "hostname"], True),
])
def test_given_twice_the_last_auto_resume_wins(argv, flag):
    cmd = parse(argv)
    assert cmd.auto_resume is flag and cmd.argv() == ["hostname"]


def test_any_spelling_of_a_node_option_is_replaced_on_a_retry():
    cmd = parse(["--auto-resume", "--nodel=n[1-3]", "-N", "3", "--nodef=h.txt", "--tasks-per-node=2", "t.sh"])
    assert (cmd.value("-w"), cmd.nodes) == ("n[1-3]", 3)
    assert cmd.argv(["n1"]) == ["--tasks-per-node=2", "--nodes=1", "--nodelist=n1", "t.sh"]


def test_rebuilt_argv_keeps_an_empty_value_and_a_dash_program():
    cmd = parse(["-J", "", "--auto-resume=0", "--", "-prog", "x"])
    assert cmd.argv() == ["-J", "", "--", "-prog", "x"]


def test_settings_from_environment_and_bad_values(tmp_path):
    s = load_settings({"HPR_AUTO_RESUME_MAX_ATTEMPTS": "5", "HPR_CHECKPOINT_DIR": "/ck"})
    assert (s.max_attempts, s.checkpoint_dir) == (5, "/ck")
    with pytest.raises(ConfigError, match="HPR_AUTO_RESUME_MAX_ATTEMPTS"):
        load_settings({"HPR_AUTO_RESUME_MAX_ATTEMPTS": "many"})
    with pytest.raises(ConfigError, match="max_attempts"):
        load_settings({"HPR_AUTO_RESUME_MAX_ATTEMPTS": "0"})
    conf = tmp_path / "ar.toml"
    conf.write_text("[auto_resume]\nmax_attempts = 4\npoll_seconds = 0.5\n")
    assert load_settings({"HPR_AUTO_RESUME_CONFIG": str(conf)}).max_attempts == 4
    conf.write_text("[auto_resume]\nmax_atempts = 4\n")
    with pytest.raises(ConfigError, match="max_atempts"):
        load_settings({"HPR_AUTO_RESUME_CONFIG": str(conf)})


def test_attempt_state_survives_a_reload_and_rejects_garbage(tmp_path):
    state = AttemptState.load(tmp_path, 42, "abc.0")
    assert state.attempts == 0
    state.attempts = 2
    state.note("requeue", why="batch host failed")
    state.save(tmp_path)
    again = AttemptState.load(tmp_path, 42, "abc.0")
    assert again.attempts == 2 and again.history[0]["event"] == "requeue"
    AttemptState.path(tmp_path, 43, "abc.0").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable auto-resume state"):
        AttemptState.load(tmp_path, 43, "abc.0")


@pytest.mark.parametrize("node, bad", [
    (Node("n1", "IDLE"), False),
    (Node("n1", "ALLOCATED", frozenset({"FAIL"}), reason="Action: Replace"), True),
    (Node("n1", "ALLOCATED", reason="Action: Reboot"), True),   # reason first, state not yet
    (Node("n1", "MIXED", frozenset({"DRAIN"}), reason="admin"), True),
    (Node("n1", "ALLOCATED", frozenset({"NOT_RESPONDING"})), True),
    (Node("n1", "DOWN", reason="Not responding"), True),
    (Node("n1", "ALLOCATED", frozenset({"COMPLETING"})), False),
])
def test_which_nodes_are_bad_for_a_step(node, bad):
    assert (why_bad(node) is not None) is bad


def test_the_shim_never_finds_itself(tmp_path):
    shim_dir, real_dir = tmp_path / "shim", tmp_path / "real"
    shim_dir.mkdir()
    real_dir.mkdir()
    (shim_dir / "srun").write_text("#!/bin/sh\n# hpresilience-srun-shim\n")
    (real_dir / "srun").write_text("#!/bin/sh\necho real\n")
    for p in (shim_dir / "srun", real_dir / "srun"):
        p.chmod(0o755)
    assert find_real_srun({"PATH": f"{shim_dir}:{real_dir}"}) == str(real_dir / "srun")
    assert find_real_srun({"PATH": str(shim_dir)}) is None


SHIM = __import__("pathlib").Path(__file__).resolve().parents[2] / "scripts" / "srun"


def test_shell_shim_hands_over_argv_stdin_and_exit_status(tmp_path):
    import subprocess
    real = tmp_path / "bin" / "srun"
    real.parent.mkdir()
    real.write_text('#!/bin/sh\nprintf "%s|" "$@"; /bin/cat; exit 7\n')
    real.chmod(0o755)
    env = {"PATH": f"{SHIM.parent}:{real.parent}"}
    proc = subprocess.run([str(SHIM), "-N2", "a b", "--label"], input=b"from stdin", capture_output=True, env=env,
                          timeout=10)
    assert (proc.returncode, proc.stdout) == (7, b"-N2|a b|--label|from stdin")
    alone = subprocess.run([str(SHIM), "x"], capture_output=True, env={"PATH": f"{SHIM.parent}:{tmp_path}"}, timeout=10)
    assert alone.returncode == 127 and b"no srun found" in alone.stderr


# Hypothesis over generated command lines (issue 11), options drawn from the table in every form.
Words = List[str]
Given = List[Tuple[str, Optional[str]]]
value_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6)
# Words a program (or a value) may hold that look like srun's options or ours.
tricky = st.sampled_from(["--auto-resume", "--auto-resume=1", "--auto-resume=0", "--", "-N", "-K", "--bcast",
                          "--kill-on-bad-exit", "-lN2", ":", "-", ""])
SHORTS = {o.short: o.kind for o in OPTIONS.values() if o.short}


@st.composite
def long_option(draw) -> Tuple[Words, Given]:
    name = draw(st.sampled_from(sorted(OPTIONS)))
    kind, option = OPTIONS[name].kind, f"--{name}"
    value = draw(st.one_of(value_text, tricky))
    forms = {FLAG: [([option], None)],
             OPTIONAL: [([option], None), ([f"{option}={value}"], value)],
             VALUE: [([f"{option}={value}"], value), ([option, value], value)]}[kind]
    words, given = draw(st.sampled_from(forms))
    return words, [(option, given)]


@st.composite
def short_bundle(draw) -> Tuple[Words, Given]:
    flags = draw(st.lists(st.sampled_from(sorted(k for k, v in SHORTS.items() if v == FLAG)), max_size=3))
    given: Given = [(f"-{f}", None) for f in flags]
    last = draw(st.one_of(st.none(), st.sampled_from(sorted(k for k, v in SHORTS.items() if v != FLAG))))
    if last is None:
        return ([f"-{''.join(flags)}"], given) if flags else ([], [])
    value = draw(st.one_of(value_text, tricky))
    word = f"-{''.join(flags)}{last}"
    if value and (SHORTS[last] == OPTIONAL or draw(st.booleans())):
        return [word + value], given + [(f"-{last}", value)]
    if SHORTS[last] == OPTIONAL:
        return [word], given + [(f"-{last}", None)]
    return [word, value], given + [(f"-{last}", value)]


ours = st.sampled_from([("--auto-resume", True), ("--auto-resume=1", True), ("--auto-resume=0", False),
                        ("--auto-resume=3", True)])


@st.composite
def command_line(draw):
    words: Words = []
    given: Given = []
    flag: Optional[bool] = None
    for part in draw(st.lists(st.one_of(long_option(), short_bundle(), ours.map(lambda o: ([o[0]], o[1]))),
                              max_size=8)):
        part_words, meaning = part
        words += part_words
        if isinstance(meaning, bool):
            flag = meaning                  # the last one wins
        else:
            given += meaning
    dashes = draw(st.booleans())
    first = draw(st.one_of(value_text, tricky) if dashes else
                 value_text.filter(lambda w: w == "-" or not w.startswith("-")))
    program = [first] + draw(st.lists(st.one_of(value_text, tricky, long_option().map(lambda o: o[0][0])),
                                      max_size=5))
    return words + (["--"] if dashes else []) + program, given, flag, program


@given(command_line())
def test_generated_command_lines_split_as_srun_splits_them(case):
    argv, given, flag, program = case
    before = list(argv)
    cmd = parse(argv)
    assert argv == before                   # the shim execs srun with this very list
    assert cmd.program == program           # nothing of the program became an option value
    assert cmd.options == given
    assert cmd.auto_resume is flag          # found wherever srun takes options, never after the program
    again = parse(cmd.argv())               # the rebuilt line means the same to srun, without our flag
    assert (again.options, again.program, again.auto_resume) == (given, program, None)


def test_an_abbreviation_of_several_options_is_refused_with_auto_resume():
    """Review of issue 11: `--par debug` is --partition to srun 22.05 but several options across
    releases start with `par`; read as a flag, the retry would have run `debug` as the program."""
    with pytest.raises(UsageError, match="--par is an abbreviation of more than one srun option"):
        parse(["--auto-resume", "--par", "debug", "-N2", "python"])
    assert parse(["--par=debug", "--auto-resume", "python"]).auto_resume    # attached: unambiguous
    assert parse(["--par", "debug", "python"]).auto_resume is None          # no flag: srun reads it
