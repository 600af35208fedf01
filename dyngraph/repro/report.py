"""Write docs/reproductions.md from docs/repro/*.json: `python -m dyngraph.repro.report`."""

from __future__ import annotations

import json

from .common import DOCS


def _load(name: str):
    p = DOCS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def section_early_exit(r) -> list[str]:
    out = [
        "## Early exits (MSDNet, SCAN) on state_tracking",
        "",
        "**Claim.** A multi-exit network at a compute budget beats a static network of the same cost.",
        "",
        "**Setup.** `specs/msdnet_early_exit.yaml` (mean of exit losses) and `specs/scan_early_exit.yaml` "
        "(plus self-distillation: KL from the last exit at T = 3, weight 0.3, averaged over exits): linear stem, 8 pre-LayerNorm residual blocks (hidden 16), an exit after "
        "each; state_tracking K=5, AdamW 2e-3 one-cycle, 5,000 steps of 256 fresh samples. Temperatures "
        "fitted per exit and the max-prob threshold calibrated on the validation split for each budget; "
        "numbers on the test split (4,000 inputs). Static networks of depth 1..8 trained alike; their "
        "accuracy at the same MACs is interpolated between depths. MACs count every exit head a sample "
        "passes. Budgets are given as fractions of the longest path (all 8 blocks and 8 heads) and of the "
        "static 8-block backbone.",
        "",
        "| spec | budget | test MACs (of longest / of backbone) | accuracy | static, same MACs | gain (points) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in ("msdnet_early_exit", "scan_early_exit"):
        for b in r[name]["budgets"]:
            out.append(
                f"| {name} | {b['budget']:.0%} of {b.get('of', 'longest_path').replace('_', ' ')} | "
                f"{b['test_macs_fraction']:.1%} / {b.get('test_backbone_fraction', float('nan')):.1%} | "
                f"{_pct(b['accuracy'])} | {_pct(b['static_accuracy_same_macs'])} | {b['gain_points']:+.2f} |"
            )
    out += [
        "",
        "Static networks (test accuracy, MACs): "
        + ", ".join(
            f"depth {s['depth']} {_pct(s['accuracy'])} ({s['macs']:,.0f})" for s in r["static"]
        )
        + ".",
        "",
    ]
    for name in ("msdnet_early_exit", "scan_early_exit"):
        d = r[name]
        out.append(
            f"- {name}: mean exit depth by k = 1..5 at the 50% budget: "
            + ", ".join(f"{v:.2f}" for v in d["mean_exit_depth_by_k"])
            + f"; every input through the last exit: {_pct(d['last_exit_accuracy'])}."
        )
    dg = r["digits"]
    out += [
        f"- digits sanity check: full depth {_pct(dg['full_accuracy'])}; at {dg['macs_fraction']:.1%} of the MACs "
        f"{_pct(dg['accuracy_at_half'])}.",
        "",
        "![early exits](repro/early_exit.png)",
        "",
        "Regenerate: `python -m dyngraph.repro early_exit` (about 15 minutes on one core, static baselines "
        "included).",
        "",
    ]
    return out


def section_gates(r) -> list[str]:
    out = [
        "## Skip gates (SkipNet feed-forward and recurrent, BlockDrop) on state_tracking",
        "",
        "**Claim.** Skipping blocks per input keeps accuracy at a fraction of the compute, and harder inputs "
        "run more blocks.",
        "",
        "**Setup.** 8 gated residual blocks (same as above). SkipNet: straight-through gates (hard forward, "
        "sigmoid gradient) with a compute penalty ramped in over 30% of the steps: 0.2 for the feed-forward "
        "gates and 0.2 for the recurrent gate (hidden 4: with 16 units each gate call cost more MACs than "
        "the 64-wide block it gates), 6,000 steps. BlockDrop: the backbone with gates "
        "sampled from the frozen initial policy (stochastic depth, 4,000 steps), the policy by REINFORCE with "
        "reward 1-(used/K)^2 if correct else -2, self-critical baseline and curriculum (2,000 steps), joint "
        "fine-tuning (3,000). Where the trained model uses more than 60% of the MACs, the gate threshold is "
        "calibrated on validation to 60%.",
        "",
        "| spec | as trained (acc, MACs) | test accuracy | MACs (of longest) | static, same MACs | gain | blocks run by k=1..5 | Spearman(blocks, k) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name in ("skipnet_ff", "skipnet_rnn", "blockdrop"):
        g = r[name]
        out.append(
            f"| {name} | {_pct(g['as_trained']['accuracy'])}, {g['as_trained']['macs_fraction']:.1%} | {_pct(g['accuracy'])} | "
            f"{g['macs_fraction']:.1%} | {_pct(g['static_accuracy_same_macs'])} | {g['gain_points']:+.2f} | "
            + ", ".join(f"{v:.2f}" for v in g["blocks_by_k"])
            + f" | {g['spearman_blocks_k']:+.2f} |"
        )
    out += [
        "",
        "![gates](repro/gates.png)",
        "",
        "Regenerate: `python -m dyngraph.repro gates`.",
        "",
    ]
    return out


def section_act(r) -> list[str]:
    a = r["act_n8"]
    return [
        "## ACT on parity (Graves 2016)",
        "",
        "**Claim.** With adaptive computation time a recurrent network solves parity, pondering more on "
        "harder inputs; with one fixed step it does not.",
        "",
        "**Setup.** `specs/act_parity.yaml`: GRU step 128 units fed the input plus a first-step flag, halting "
        "unit bias +1, epsilon 0.01, at most 20 steps, tau 1e-3, Adam 1e-3, batch 128 of fresh samples, "
        "12,000 steps (at 8,000: 99.87% but Spearman +0.44); the same network with `max_steps: 1` trained alike; then n = 16.",
        "",
        f"- n = 8: test accuracy **{_pct(a['accuracy'])}**, mean {a['mean_steps']:.2f} ponder steps; "
        f"fixed one step: **{_pct(r['fixed_one_step_n8']['accuracy'])}**.",
        "- mean steps by number of non-zero bits (1..8): "
        + ", ".join(f"{v:.2f}" for v in a["steps_by_nonzero"])
        + f"; Spearman(steps, non-zero bits) = **{a['spearman']:+.2f}**.",
        f"- n = 16: test accuracy {_pct(r['act_n16']['accuracy'])}, Spearman {r['act_n16']['spearman']:+.2f}.",
        "",
        "![act](repro/act.png)",
        "",
        "Regenerate: `python -m dyngraph.repro act`.",
        "",
    ]


def section_pondernet(r) -> list[str]:
    return [
        "## PonderNet on parity",
        "",
        "**Setup.** `specs/pondernet_parity.yaml`: the same GRU step, lambda unit, at most 20 steps, geometric "
        "prior lambda_p = 0.2 with KL weight 0.01, 8,000 steps; inference halts where the probability of having "
        "halted reaches 0.5.",
        "",
        f"- test accuracy **{_pct(r['accuracy'])}**, mean **{r['mean_steps']:.2f}** steps; steps by non-zero "
        "bits: "
        + ", ".join(f"{v:.2f}" for v in r["steps_by_nonzero"])
        + f" (Spearman {r['spearman']:+.2f}).",
        "",
        "![pondernet](repro/pondernet.png)",
        "",
        "Regenerate: `python -m dyngraph.repro pondernet`.",
        "",
    ]


def section_l2s(r) -> list[str]:
    out = [
        "## Learning to Stop on sparse recovery (Chen et al.)",
        "",
        "**Claim.** Stopping each input at its own depth beats stopping all inputs at the same depth, at equal "
        "mean depth.",
        "",
        "**Setup.** `specs/l2s_lista.yaml`: 16 unshared residual LISTA layers, A 64x128 (seed 0), support "
        "probability 0.1, SNR 20 dB; stage I (3,000 steps) the oracle-weighted per-layer loss with "
        "q* = softmin(L_t / beta), beta 0.1; stage II (2,000 steps) the stop policy (MLP on [y, x_t, one-hot t]) "
        "minimizes KL(q* || q_phi). The stop threshold is swept on the test split; fixed-depth NMSE is "
        "interpolated at the same mean depth.",
        "",
        "| threshold | mean depth | NMSE (dB) | fixed depth, same mean (dB) | gain (dB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in r["policy"]:
        out.append(
            f"| {c['threshold']:g} | {c['mean_depth']:.2f} | {c['nmse_db']:.2f} | {c['fixed_depth_nmse_db']:.2f} | {c['gain_db']:+.2f} |"
        )
    out += [
        "",
        f"Depth budgets (strictly between 2 and 15 layers) with a gain of at least 0.1 dB: "
        f"**{r['budgets_with_gain_0.1dB']}**.",
        "",
        "![l2s](repro/l2s.png)",
        "",
        "Regenerate: `python -m dyngraph.repro l2s`.",
        "",
    ]
    return out


def section_composer(r) -> list[str]:
    out = [
        "## Composer on wide digits (Odena et al.)",
        "",
        "**Claim.** One controller, steered at test time by gamma, trades accuracy for parameters above random "
        "mixing of its modules, and sends the inputs the small module can handle to it first.",
        "",
        "**Setup.** `specs/composer_wide_digits.yaml`: wide digits (8x16, 20 classes); small module = glimpse "
        "of the left 8x8 + MLP 64-5-20 (445 parameters); large = MLP on all 128 pixels (114k); composer_rnn "
        "controller (hidden 32) fed gamma ~ U[0, 4] in training; cost = chosen module's parameters / the large "
        "one's. 100 epochs training the modules with random routing, then 200 epochs of the Composer objective: "
        "REINFORCE on log p(y|x,c) (batch-mean baseline, 10% of samples routed at random) plus the exact "
        "expected cost under the policy. "
        f"Small module only: {_pct(r['small_only_accuracy'])}, large only: {_pct(r['large_only_accuracy'])}.",
        "",
        "| gamma | params used | accuracy | random mixing | gain (points) | left → small | right → small |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["points"]:
        out.append(
            f"| {p['gamma']:g} | {p['params_fraction']:.1%} | {_pct(p['accuracy'])} | {_pct(p['random_mixing_accuracy'])} | "
            f"{p['gain_points']:+.1f} | {p['left_to_small']:.0%} | {p['right_to_small']:.0%} |"
        )
    g = r["max_gain_50_65"]
    out += [
        "",
        f"Largest gain over random mixing between 50% and 65% of the parameters: "
        f"**{'none in that range' if g is None else f'{g:+.1f} points'}**.",
        "",
        "![composer](repro/composer.png)",
        "",
        "Regenerate: `python -m dyngraph.repro composer`.",
        "",
    ]
    return out


def main() -> None:
    lines = [
        "# Reproductions",
        "",
        "*Generated by `python -m dyngraph.repro.report` from `docs/repro/*.json`, which "
        "`python -m dyngraph.repro NAME` writes. Each has a slow-tier test (`make test-slow`).* "
        "Every number is from a run on this project's 2-core CPU, one thread per run, data generated or "
        "shipped (nothing downloaded).",
        "",
    ]
    for name, fn in (
        ("early_exit", section_early_exit),
        ("gates", section_gates),
        ("act", section_act),
        ("pondernet", section_pondernet),
        ("l2s", section_l2s),
        ("composer", section_composer),
    ):
        r = _load(name)
        lines += (
            fn(r)
            if r
            else [f"## {name}", "", "Not run yet: `python -m dyngraph.repro " + name + "`.", ""]
        )
    (DOCS.parent / "reproductions.md").write_text("\n".join(lines))
    print(f"wrote {DOCS.parent / 'reproductions.md'}")


if __name__ == "__main__":
    main()
