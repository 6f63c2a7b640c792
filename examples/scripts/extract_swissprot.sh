#!/usr/bin/env bash
# Extracts the UniProtKB/Swiss-Prot proteins that Debian's `metastudent-data` package ships as a
# BLAST database (dataset_201401, molecular-function set: 459,503 sequences, 170,481,152 residues)
# into a FASTA.gz that `helix train --data` reads.
#
#   extract_swissprot.sh OUT.fasta.gz                  the whole set (about 100 MB gzipped)
#   extract_swissprot.sh --every 153 --count 3000 OUT  every 153rd record, the first 3000 of them
#                                                      (how examples/data/swissprot_3k.fasta.gz is made)
#   --keep-go                                          keep metastudent's GO terms in the headers
#
# Headers are cut to the UniProt accession (">B0RED7"); the database appends the record's GO
# molecular-function terms (">B0RED7|GO:0046933,..."), which the masked-LM pipeline does not use.
# Needs `blastdbcmd` (Debian package ncbi-blast+) and the database (metastudent-data, ~225 MB
# download); both are installed with apt-get when missing and the script runs as root.
# HELIX_SWISSPROT_DB overrides the database path. The output is byte-for-byte reproducible
# (gzip -n: no name or time stamp in the gzip header).
set -euo pipefail

db=${HELIX_SWISSPROT_DB:-/usr/share/metastudent-data/dataset_201401/MFO/goasp.fasta}
every=1
count=0
keep_go=0
expected_all=459503

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }
out=""
while [ $# -gt 0 ]; do
  case $1 in
    --every) every=${2:?--every needs a number}; shift 2 ;;
    --count) count=${2:?--count needs a number}; shift 2 ;;
    --keep-go) keep_go=1; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "extract_swissprot.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out=$1; shift ;;
  esac
done
[ -n "$out" ] || usage
case $every$count in *[!0-9]*) echo "extract_swissprot.sh: --every and --count take whole numbers" >&2; exit 1 ;; esac
[ "$every" -ge 1 ] || { echo "extract_swissprot.sh: --every must be >= 1" >&2; exit 1; }

# Install what is missing (Debian/Ubuntu, as root); otherwise say what to install.
need=()
command -v blastdbcmd >/dev/null 2>&1 || need+=(ncbi-blast+)
[ -e "$db.pin" ] || [ -n "${HELIX_SWISSPROT_DB:-}" ] || need+=(metastudent-data)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "extract_swissprot.sh: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >&2 ||
      { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >&2; }
  else
    echo "extract_swissprot.sh: missing ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi
[ -e "$db.pin" ] || { echo "extract_swissprot.sh: no BLAST database at $db (expected $db.pin)" >&2; exit 1; }

tmp=$(mktemp "${out}.XXXXXX")
trap 'rm -f "$tmp"' EXIT
# Record k (0-based) is kept when k % every == 0, up to `count` records (0 = all).
blastdbcmd -db "$db" -entry all |
  awk -v every="$every" -v count="$count" -v keep_go="$keep_go" '
    /^>/ { k++; keep = ((k - 1) % every == 0) && (count == 0 || kept < count); if (keep) kept++
           if (!keep_go) sub(/\|.*/, "") }
    keep { print }' |
  gzip -n -9 > "$tmp"

n=$(gzip -dc "$tmp" | grep -c '^>' || true)
if [ "$every" = 1 ] && [ "$count" = 0 ] && [ "$n" != "$expected_all" ]; then
  echo "extract_swissprot.sh: expected $expected_all sequences, got $n (another database version?)" >&2
  exit 1
fi
chmod a+r,u+w "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "extract_swissprot.sh: wrote $n sequences to $out ($(du -h "$out" | cut -f1))"
