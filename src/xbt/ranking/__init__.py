"""What a gallery needs at search time to rank well, below the gallery and the evaluation that both use it:
hubness calibration (`nnn`: the NNN bias, its weight chosen on val), the two rules that merge an old-space
and a new-space ranking during a backfill and their score calibration (`merge`), and the benefit estimate
that orders a backfill (`benefit`)."""
