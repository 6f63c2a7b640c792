#!/usr/bin/env bash
# End-to-end checkpoint tests driving the `helix` binary (CPU ranks under mpirun), one case per
# ctest test:  checkpoint_cli.sh CASE HELIX MPIRUN...
# A tiny ESM-2 (2 layers, hidden 64) on the bundled Swiss-Prot sample; every comparison is against
# an uninterrupted run (never a run against itself):
#   resume_1rank / resume_tp2 / resume_dp2  N steps straight == K steps, new process, N-K steps:
#                                            per-step losses and every final shard file bitwise equal
#                                            (resume_1rank also checks --keep)
#   reshard_4to1 / reshard_1to4              saved on tp 2 x dp 2, resumed on 1 rank (and back): the
#                                            losses of the continued steps within fp32 tolerance
#   resume_cp2 / resume_pp2 / resume_fp8     bitwise resume under --cp 2, --pp 2, --fp8 delayed (the
#                                            FP8 amax histories and scales are in the checkpoint)
#   resume_fp8_pp                            bitwise resume under --pp 2 --fp8 delayed (each stage's
#                                            FP8 state is per rank: its own layers' histories)
#   reshard_pp2to1                           saved on pp 2, resumed on 1 rank: losses within tolerance
#   resume_zero / reshard_zero               the same with ZeRO (flat shards): bitwise with --zero 3,
#                                            tp 2 x dp 2 --zero 1 -> dp 2 --zero 3 and -> 1 rank
#   resume_zero_pp / reshard_zero_pp        ZeRO under pipeline parallelism: bitwise resume on pp 2 x
#                                            dp 2 --zero 3; saved there with --zero 2, resumed on 1 rank
#   killed_save                              a process that dies in the middle of a save leaves the
#                                            previous checkpoint, which resumes bitwise
#   damaged                                  truncated / corrupted / missing rank file, a cut meta.json,
#                                            another model,
#                                            another vocabulary, a per-rank state on another layout,
#                                            another data plan, an empty directory: refused with one
#                                            line, non-zero, nothing in the run directory changed
#   export                                   HF -> helix -> HF bitwise; checkpoint export == trainer's
#                                            export; eval of both equal
set -u
CASE=$1
HELIX=$2
shift 2
MPIRUN=("$@")
SRC=$(cd "$(dirname "$0")/../.." && pwd)
DATA=$SRC/examples/data/swissprot_3k.fasta.gz
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1
# CPU ranks by default (ctest); HELIX_CKPT_TEST_DEVICE=cuda runs the same cases on the GPU (bf16
# compute: the cross-layout comparisons then use a bf16 tolerance, bitwise resume stays bitwise).
DEVICE=${HELIX_CKPT_TEST_DEVICE:-cpu}
TOL=2e-5
[ "$DEVICE" = cpu ] || TOL=2e-2
COMMON=(--device "$DEVICE" --data "$DATA" --max-residues 62 --tokens-per-step 512 --warmup 2 --eval-batches 0 --log-interval 100)
MODEL=(--layers 2 --hidden 64 --heads 4 --ffn 128)
ARGS=("${COMMON[@]}" "${MODEL[@]}" --steps 6)

fail() { echo "FAIL ($CASE): $*"; exit 1; }
run() {  # run NP ARGS...: helix on NP ranks (1: no mpirun)
  local np=$1
  shift
  if [ "$np" = 1 ]; then "$HELIX" "$@"; else "${MPIRUN[@]}" -np "$np" "$HELIX" "$@"; fi
}
losses() { grep -o '"loss":[^,]*' "$1" | cut -d: -f2; }
same_files() {  # same_files DIR_A DIR_B: every file of A byte-identical in B
  local f
  for f in "$1"/*; do cmp -s "$f" "$2/$(basename "$f")" || fail "$(basename "$f") differs between $1 and $2"; done
}
close_losses() {  # close_losses FILE_A FILE_B: same count, |a-b| <= TOL * max(1, |a|)
  paste <(losses "$1") <(losses "$2") | awk -v a="$1" -v b="$2" -v tol="$TOL" '
    NF != 2 { bad = 1 } { d = $1 - $2; if (d < 0) d = -d; m = $1 < 0 ? -$1 : $1; if (m < 1) m = 1;
      if (d > tol * m) { bad = 1; print "  loss " NR ": " $1 " vs " $2 } }
    END { if (NR == 0 || bad) { print "losses differ: " a " vs " b; exit 1 } }' || fail "losses"
}

# N steps straight (save every 3), then K = 3 steps + a new process for the rest; bitwise.
bitwise_resume() {
  local np=$1
  shift
  run "$np" train "${ARGS[@]}" "$@" --out straight --save straight_ck --save-every 3 > log_a 2>&1 || { cat log_a; fail "straight run"; }
  run "$np" train "${ARGS[@]}" "$@" --out resumed --save resumed_ck --stop-after 3 > log_b 2>&1 || { cat log_b; fail "first half"; }
  [ -d resumed_ck/step_00000003 ] && [ ! -d resumed_ck/step_00000006 ] || fail "expected only step 3 after --stop-after 3"
  run "$np" train "${ARGS[@]}" "$@" --out resumed --save resumed_ck --resume resumed_ck > log_c 2>&1 || { cat log_c; fail "resume"; }
  grep -q "resumed from resumed_ck/step_00000003" log_c || fail "the resume did not report step 3"
  [ "$(losses straight/metrics.jsonl | wc -l)" = 6 ] || fail "expected 6 losses"
  diff <(losses straight/metrics.jsonl) <(losses resumed/metrics.jsonl) || fail "per-step losses differ"
  same_files straight_ck/step_00000006 resumed_ck/step_00000006
  cmp -s straight/model.safetensors resumed/model.safetensors || fail "final exported parameters differ"
  echo "ok: $np rank(s) $*: 6 steps straight == 3 + resume + 3 (losses, masters, moments bitwise)"
}

case $CASE in
  resume_1rank)
    bitwise_resume 1
    # --keep 2 with a save every 2 steps: only the newest two of steps 2, 4, 6 remain.
    run 1 train "${ARGS[@]}" --save kept --save-every 2 --keep 2 > log_k 2>&1 || { cat log_k; fail "--keep run"; }
    [ "$(ls kept | tr '\n' ' ')" = "step_00000004 step_00000006 " ] || fail "--keep 2 left: $(ls -a kept)"
    echo "ok: --keep 2 keeps steps 4 and 6"
    # A fresh run into a directory with newer checkpoints, or a resume with nothing left to do: refused.
    run 1 train "${ARGS[@]}" --save kept > log_f 2>&1 && fail "a fresh run overwrote --save kept"
    grep -q "holds checkpoints up to step 6, past this run's start (step 0)" log_f || { cat log_f; fail "overwrite message"; }
    run 1 train "${ARGS[@]}" --resume kept > log_g 2>&1 && fail "resume at the last step exited 0"
    grep -q "the checkpoint is at step 6, this run ends at step 6" log_g || { cat log_g; fail "nothing-to-do message"; }
    [ "$(ls kept | tr '\n' ' ')" = "step_00000004 step_00000006 " ] || fail "the refused runs changed kept/"
    ;;
  resume_tp2) bitwise_resume 2 --tp 2 ;;
  resume_dp2) bitwise_resume 2 ;;
  resume_zero) bitwise_resume 2 --zero 3 ;;
  resume_zero_pp) bitwise_resume 4 --pp 2 --zero 3 --micro-batches 2 ;;
  reshard_zero_pp)
    # Each stage's dp ranks write flat pieces of its own tensors (the tied embedding once, stage 0).
    run 4 train "${ARGS[@]}" --pp 2 --zero 2 --micro-batches 2 --out four --save four_ck --save-every 3 > log_a 2>&1 || { cat log_a; fail "pp 2 x dp 2"; }
    grep -q '"flat"' four_ck/step_00000003/meta.json || fail "expected flat pieces in a ZeRO checkpoint"
    run 1 train "${ARGS[@]}" --micro-batches 4 --out one --resume four_ck/step_00000003 > log_b 2>&1 || { cat log_b; fail "resume on 1"; }
    losses four/metrics.jsonl | tail -n 3 | sed 's/^/"loss":/' > four_tail.jsonl
    close_losses four_tail.jsonl one/metrics.jsonl
    echo "ok: saved on pp 2 x dp 2 --zero 2, resumed on 1 rank"
    ;;
  resume_cp2) bitwise_resume 2 --cp 2 --cp-split-min-len 0 ;;
  resume_pp2) bitwise_resume 2 --pp 2 --micro-batches 2 ;;
  resume_fp8) bitwise_resume 1 --fp8 delayed ;;
  resume_fp8_pp)
    bitwise_resume 2 --pp 2 --micro-batches 2 --fp8 delayed
    # The stages' FP8 states differ: saved per rank, so another layout is refused naming the state.
    run 1 train "${ARGS[@]}" --fp8 delayed --resume resumed_ck > log_d 2>&1 && fail "pp 2 FP8 state resumed on 1 rank"
    grep -q "state 'extra/fp8/amax_history@rank0' is per-rank and was saved on tp 1 x cp 1 x dp 1 x pp 2" log_d || { cat log_d; fail "per-rank FP8 state message"; }
    echo "ok: pp 2 FP8 state refused on 1 rank"
    ;;
  reshard_pp2to1)
    # Pipeline stages write disjoint tensors (the tied embedding once): saved on pp 2, resumed on 1 rank.
    run 2 train "${ARGS[@]}" --pp 2 --micro-batches 2 --out two --save two_ck --save-every 3 > log_a 2>&1 || { cat log_a; fail "pp 2"; }
    run 1 train "${ARGS[@]}" --micro-batches 2 --out one --resume two_ck/step_00000003 > log_b 2>&1 || { cat log_b; fail "resume on 1"; }
    losses two/metrics.jsonl | tail -n 3 | sed 's/^/"loss":/' > two_tail.jsonl
    close_losses two_tail.jsonl one/metrics.jsonl
    echo "ok: saved on pp 2, resumed on 1 rank"
    ;;
  reshard_zero)
    # ZeRO shards are flat ranges of the TP boxes: saved on tp 2 x dp 2 with --zero 1, resumed on
    # 2 ranks with --zero 3 (dp 2) and on 1 rank without ZeRO (2 micro-batches).
    run 4 train "${ARGS[@]}" --tp 2 --zero 1 --out four --save four_ck --save-every 3 > log_a 2>&1 || { cat log_a; fail "4 ranks"; }
    grep -q '"flat"' four_ck/step_00000003/meta.json || fail "expected flat pieces in a ZeRO checkpoint"
    run 2 train "${ARGS[@]}" --zero 3 --out two --resume four_ck/step_00000003 > log_b 2>&1 || { cat log_b; fail "resume on 2 (zero 3)"; }
    run 1 train "${ARGS[@]}" --micro-batches 2 --out one --resume four_ck/step_00000003 > log_c 2>&1 || { cat log_c; fail "resume on 1"; }
    losses four/metrics.jsonl | tail -n 3 | sed 's/^/"loss":/' > four_tail.jsonl
    close_losses four_tail.jsonl two/metrics.jsonl
    close_losses four_tail.jsonl one/metrics.jsonl
    echo "ok: saved on tp 2 x dp 2 --zero 1; resumed with --zero 3 on dp 2 and without ZeRO on 1 rank"
    ;;
  reshard_4to1)
    # tp 2 x dp 2 with 1 micro-batch per rank == 1 rank with 2 micro-batches (same batches, same cursor).
    run 4 train "${ARGS[@]}" --tp 2 --out four --save four_ck --save-every 3 > log_a 2>&1 || { cat log_a; fail "4 ranks"; }
    run 1 train "${ARGS[@]}" --micro-batches 2 --out one --resume four_ck/step_00000003 > log_b 2>&1 || { cat log_b; fail "resume on 1"; }
    grep -q "saved on tp 2 x cp 1 x dp 2 x pp 1 (4 ranks)" log_b || fail "resume did not report the saved layout"
    losses four/metrics.jsonl | tail -n 3 > four_tail
    echo "$(sed 's/^/"loss":/' four_tail)" > four_tail.jsonl
    close_losses four_tail.jsonl one/metrics.jsonl
    echo "ok: saved on tp 2 x dp 2, resumed on 1 rank: steps 4-6 match the 4-rank run"
    ;;
  reshard_1to4)
    run 1 train "${ARGS[@]}" --micro-batches 2 --out one --save one_ck --save-every 3 > log_a 2>&1 || { cat log_a; fail "1 rank"; }
    run 4 train "${ARGS[@]}" --tp 2 --out four --resume one_ck/step_00000003 > log_b 2>&1 || { cat log_b; fail "resume on 4"; }
    losses one/metrics.jsonl | tail -n 3 | sed 's/^/"loss":/' > one_tail.jsonl
    close_losses one_tail.jsonl four/metrics.jsonl
    # And the continued run's final parameters match the 1-rank run's (fp32 tolerance is checked by
    # the losses; the shapes and names by the export loading at all).
    "$HELIX" eval --device "$DEVICE" --load hf:four/model.safetensors --data "$DATA" --max-residues 62 --batches 4 > e4 || fail "eval 4"
    "$HELIX" eval --device "$DEVICE" --load hf:one/model.safetensors --data "$DATA" --max-residues 62 --batches 4 > e1 || fail "eval 1"
    paste <(grep -o 'loss [0-9.]*' e1 | cut -d' ' -f2) <(grep -o 'loss [0-9.]*' e4 | cut -d' ' -f2) |
      awk -v tol="$TOL" '{ d = $1 - $2; if (d < 0) d = -d; exit !(d < 5 * tol) }' || fail "eval losses differ: $(cat e1 e4)"
    echo "ok: saved on 1 rank, resumed on tp 2 x dp 2: steps 4-6 and the final model match"
    ;;
  killed_save)
    run 1 train "${ARGS[@]}" --out straight > log_a 2>&1 || { cat log_a; fail "straight"; }
    HELIX_CHECKPOINT_FAULT=before_rename:4 run 1 train "${ARGS[@]}" --out k --save k_ck --save-every 2 > log_b 2>&1 &&
      fail "the fault-injected run exited 0"
    grep -q "HELIX_CHECKPOINT_FAULT" log_b || { cat log_b; fail "the fault did not fire"; }
    [ -d k_ck/step_00000002 ] && [ ! -d k_ck/step_00000004 ] && [ -d k_ck/.step_00000004.tmp ] ||
      fail "expected step 2 complete, step 4 only as a temporary directory: $(ls -a k_ck)"
    # Two ranks, the last one dies right after writing its rank file.
    HELIX_CHECKPOINT_FAULT=rank_file:4 run 2 train "${ARGS[@]}" --tp 2 --out k2 --save k2_ck --save-every 2 \
      > log_d 2>&1 && fail "the 2-rank fault-injected run exited 0"
    [ -d k2_ck/step_00000002 ] && [ ! -d k2_ck/step_00000004 ] || fail "2 ranks: expected step 2 only: $(ls -a k2_ck)"
    # The survivors resume (the temporary directory is ignored, then cleaned up) and end bitwise equal.
    run 1 train "${ARGS[@]}" --out k --save k_ck --save-every 2 --resume k_ck > log_c 2>&1 || { cat log_c; fail "resume"; }
    grep -q "resumed from k_ck/step_00000002" log_c || fail "did not resume from step 2"
    [ ! -d k_ck/.step_00000004.tmp ] || fail "the temporary directory of the killed save was not cleaned up"
    cmp -s straight/model.safetensors k/model.safetensors || fail "the resumed run's parameters differ from a straight run"
    run 2 train "${ARGS[@]}" --tp 2 --out k2 --resume k2_ck > log_e 2>&1 || { cat log_e; fail "2-rank resume"; }
    close_losses <(losses straight/metrics.jsonl | tail -n 4 | sed 's/^/"loss":/') <(losses k2/metrics.jsonl | tail -n 4 | sed 's/^/"loss":/')
    echo "ok: a save killed before the rename (1 rank) or after a rank file (2 ranks) leaves step 2, which resumes"
    ;;
  damaged)
    run 1 train "${ARGS[@]}" --out a --save good --save-every 3 > log_a 2>&1 || { cat log_a; fail "train"; }
    run 2 train "${ARGS[@]}" --tp 2 --out a2 --save good2 --stop-after 3 > log_b 2>&1 || { cat log_b; fail "train 2"; }
    expect_refused() {  # expect_refused NAME NP DIR PATTERN ARGS...: non-zero, message, DIR unchanged
      local name=$1 np=$2 dir=$3 pattern=$4
      shift 4
      local before after
      before=$(cd "$dir" && find . -type f -exec md5sum {} + | sort)
      local model=("${MODEL[@]}")
      [ "$name" = other_model ] && model=(--layers 2 --hidden 32 --heads 4 --ffn 128)
      if run "$np" train "${COMMON[@]}" "${model[@]}" --steps 6 --resume "$dir" --save "$dir" "$@" > "log_$name" 2>&1; then
        fail "$name: exit 0"
      fi
      grep -Eq -- "$pattern" "log_$name" || { cat "log_$name"; fail "$name: expected /$pattern/"; }
      [ "$(grep -c 'error' "log_$name")" -ge 1 ] || fail "$name: no error line"
      grep -q "step 4/6\|step 6/6" "log_$name" && fail "$name: training ran"
      after=$(cd "$dir" && find . -type f -exec md5sum {} + | sort)
      [ "$before" = "$after" ] || fail "$name: the run directory changed"
      echo "ok: $name refused: $(grep -m1 -o 'error: .*' "log_$name" | cut -c1-150)"
    }
    cp -r good trunc && truncate -s -100 trunc/step_00000006/rank_00000.safetensors
    expect_refused truncated 1 trunc "rank file 'rank_00000.safetensors' is truncated: expected [0-9]+ bytes"
    cp -r good crc && printf '\x55' | dd of=crc/step_00000006/rank_00000.safetensors bs=1 seek=5000 conv=notrunc status=none
    expect_refused checksum 1 crc "rank file 'rank_00000.safetensors' is damaged: expected CRC-32"
    cp -r good2 missing && rm missing/step_00000003/rank_00001.safetensors
    expect_refused missing_rank 1 missing "rank file 'rank_00001.safetensors' is missing"
    cp -r good meta && truncate -s 300 meta/step_00000006/meta.json
    expect_refused meta 1 meta "meta.json"
    cp -r good model
    expect_refused other_model 1 model "checkpoint of another model: hidden 64 .*, this run has hidden 32"
    cp -r good vocab && sed -i 's/"<mask>"/"<msk>"/' vocab/step_00000006/meta.json
    expect_refused other_vocab 1 vocab "checkpoint vocabulary differs at id 32: '<msk>'"
    cp -r good layout && sed -i '0,/"reshard": "any"/s//"reshard": "same_layout"/' layout/step_00000006/meta.json
    expect_refused layout 2 layout "is per-rank and was saved on tp 1 x cp 1 x dp 1 x pp 1 \(1 ranks\); this run is tp 2.*cannot be resharded" --tp 2
    cp -r good plan
    expect_refused data_plan 1 plan "--seed was 1 when the checkpoint was written, this run has 2" --seed 2
    mkdir empty
    expect_refused empty 1 empty "--resume 'empty': no complete checkpoint"
    ;;
  export)
    run 1 train "${ARGS[@]}" --out a --save ck > log_a 2>&1 || { cat log_a; fail "train"; }
    "$HELIX" convert --from hf:a/model.safetensors --to imported > log_b 2>&1 || { cat log_b; fail "import"; }
    "$HELIX" convert --from imported --to hf:exported > log_c 2>&1 || { cat log_c; fail "export"; }
    cmp -s a/model.safetensors exported/model.safetensors || fail "HF -> helix -> HF is not bitwise"
    cmp -s a/config.json exported/config.json || fail "config.json differs"
    "$HELIX" convert --from ck --to hf:from_ckpt > log_d 2>&1 || { cat log_d; fail "checkpoint export"; }
    cmp -s a/model.safetensors from_ckpt/model.safetensors || fail "checkpoint export differs from the trainer's"
    # A training run continues from the imported weights (a weights-only checkpoint: step 0).
    run 1 train "${COMMON[@]}" "${MODEL[@]}" --steps 2 --resume imported --out ft > log_e 2>&1 || { cat log_e; fail "fine-tune"; }
    "$HELIX" eval --device "$DEVICE" --load ck --data "$DATA" --max-residues 62 --batches 3 --seed 5 > e1 || fail "eval ck"
    "$HELIX" eval --device "$DEVICE" --load hf:exported/model.safetensors --data "$DATA" --max-residues 62 --batches 3 --seed 5 > e2 || fail "eval hf"
    [ "$(grep ^eval e1 | sed "s/.*: //")" = "$(grep ^eval e2 | sed "s/.*: //")" ] || fail "eval differs: $(cat e1 e2)"
    "$HELIX" eval --device "$DEVICE" --load ck --data "$DATA" --max-residues 62 --batches 3 --seed 6 > e3 || fail "eval seed 6"
    [ "$(grep ^eval e1 | sed "s/.*: //")" != "$(grep ^eval e3 | sed "s/.*: //")" ] || fail "the masking seed changes nothing"
    "$HELIX" convert --from hf:a/model.safetensors --to imported > log_f 2>&1 && fail "convert over a run directory"
    grep -q "already holds checkpoints" log_f || fail "convert refusal message"
    echo "ok: export round trip bitwise; eval: $(grep ^eval e1 | sed "s/.*: //")"
    ;;
  *) fail "unknown case" ;;
esac
exit 0
