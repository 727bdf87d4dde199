import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcd_fx
from qcd_fx.errors import PipelineSpecError
from qcd_fx.passes import CSC, QCI, CDGPrune, Pipeline, registry


def test_public_api_example():
    assert Pipeline.parse("qci{min_width=64}") == Pipeline([QCI(min_width=64)])
    assert qcd_fx.Pipeline.parse("qci{min_width=64}") == qcd_fx.Pipeline([qcd_fx.passes.QCI(min_width=64)])
    assert registry()["qci"] is QCI and registry()["csc"] is CSC and registry()["cdg-prune"] is CDGPrune


def test_full_spec_maps_one_to_one():
    p = Pipeline.parse(" qci{ min_width = 64, init=identity, rank=8 }, csc{alpha=0.25,target=[layer1*,fc],hard=yes,dim=1}")
    assert p == Pipeline([QCI(min_width=64, init="identity", rank=8), CSC(alpha=0.25, target=("layer1*", "fc"), hard=True, dim=1)])
    assert str(p) == "qci{min_width=64,rank=8},csc{alpha=0.25,target=[layer1*,fc],dim=1,hard=true}"


def test_aliases_and_defaults():
    assert Pipeline.parse("qci{rank=full},csc{dim=auto}") == Pipeline([QCI(), CSC()])
    assert str(Pipeline.parse("qci,csc")) == "qci,csc"
    assert Pipeline.parse("csc{target=activations}").passes[0].target == "activations"
    assert Pipeline.parse("csc{target=layer1.*}").passes[0].target == "layer1.*"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("qcj", "unknown pass 'qcj' (did you mean 'qci'?)"),
        ("qci{min_wdth=3}", "no option 'min_wdth' (did you mean 'min_width'?)"),
        ("qci{min_width=abc}", "must be an integer"),
        ("qci{init=seeds}", "must be one of identity, seed, not 'seeds' (did you mean 'seed'?)"),
        ("qci{min_width=3,min_width=4}", "given twice"),
        ("qci{min_width}", "is not KEY=VALUE"),
        ("qci{min_width=3", "missing '}'"),
        ("qci}", "unbalanced"),
        ("", "empty pipeline spec"),
        ("qci,,csc", "empty pass name"),
        ("csc{hard=maybe}", "must be true or false"),
        ("qci{rank=0}", "rank must be >= 1"),
        ("qci{min_width=-1}", "min_width must be >= 0"),
        ("csc{alpha=[1,2]}", "not a list"),
        ("csc{target=[]}", "target list is empty"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(PipelineSpecError) as info:
        Pipeline.parse(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_pipeline_rejects_non_passes():
    with pytest.raises(TypeError):
        Pipeline(["qci"])


globs = st.text(alphabet="abcdefgh_.*0123456789", min_size=1, max_size=8).filter(lambda s: s not in ("output", "activations"))
qci_passes = st.builds(
    QCI,
    min_width=st.integers(0, 4096),
    init=st.sampled_from(["identity", "seed"]),
    rank=st.one_of(st.none(), st.integers(1, 64)),
    beta=st.floats(-4, 4, allow_nan=False).map(lambda f: round(f, 3)),
    seed=st.integers(0, 2**31),
)
csc_passes = st.builds(
    CSC,
    alpha=st.floats(0, 10, allow_nan=False).map(lambda f: round(f, 4)),
    target=st.one_of(st.sampled_from(["output", "activations"]), st.lists(globs, min_size=1, max_size=3).map(tuple)),
    dim=st.one_of(st.none(), st.integers(-3, 3)),
    hard=st.booleans(),
)


prune_passes = st.builds(
    CDGPrune,
    ratio=st.one_of(st.none(), st.floats(0, 0.99).map(lambda f: round(f, 3))),
    criterion=st.sampled_from(["cdg", "l1", "l2", "random"]),
    round_to=st.integers(1, 64),
    scope=st.sampled_from(["channels", "nodes", "both"]),
    seed=st.integers(0, 1000),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(qci_passes, csc_passes, prune_passes), min_size=1, max_size=5))
def test_spec_round_trips(passes):
    pipeline = Pipeline(passes)
    assert Pipeline.parse(str(pipeline)) == pipeline
