import pytest
from ClusterShell.NodeSet import NodeSet

from hpresilience.slurm.errors import InvalidNodeName
from hpresilience.slurm.hostlist import expand, expand_or_empty, fold, nodeset


@pytest.mark.parametrize("expr, names", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[1-2],gpu-[01-02]", ["gpu-01", "gpu-02", "n1", "n2"]),
    ("p5-dy-gpu-[1,3]", ["p5-dy-gpu-1", "p5-dy-gpu-3"]),
])
def test_expand(expr, names):
    assert sorted(expand(expr)) == names


def test_fold_accepts_lists_and_nodesets():
    assert fold(["n3", "n1", "n2"]) == "n[1-3]"
    assert fold(NodeSet("n[1-4]") - NodeSet("n2")) == "n[1,3-4]"
    assert fold(["n[1-2]", "n4"]) == "n[1-2,4]"


@pytest.mark.parametrize("bad", ["", " ", "n1 n2", "n1;reboot", "n[1-", "state=down", "n1\n", "n'1"])
def test_invalid_names_raise_naming_input(bad):
    with pytest.raises(InvalidNodeName) as err:
        nodeset(bad)
    assert err.value.text == bad and repr(bad) in str(err.value)


def test_empty_list_is_invalid():
    with pytest.raises(InvalidNodeName):
        nodeset([])


@pytest.mark.parametrize("text", ["", "(null)", "None"])
def test_slurm_empty_nodelists(text):
    assert expand_or_empty(text) == []
