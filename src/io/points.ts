/**
 * Named I/O points. Every write or flush the engine issues names the point it
 * serves, so tests can fail exactly that step (as QEMU's blkdebug events do)
 * and the crash harness can tell which metadata a recorded write touched.
 */
export type IoPoint =
  // shared
  | 'header_update' // header fields (features, table switch)
  | 'data_write' // guest data only: into a mapped cluster, or (qcow2) a whole new cluster with nothing to copy
  | 'cow_write' // a new or rewritten cluster with a head/tail to fill: the guest data and the fill (QED: every allocating write)
  | 'flush' // fdatasync of the file
  | 'truncate' // file size change (today only `qmount check --repair` of QED truncates)
  | 'data_punch' // a hole punched for guest data let go of (raw discard; a freed data cluster in qcow2/QED)
  // qcow2
  | 'l1_update'
  | 'l1_grow' // reserved: the engine never resizes an L1 table (no disk resize)
  | 'l2_alloc' // a new L2 table written before L1 points at it
  | 'l2_update'
  | 'refblock_alloc' // a new refcount block written before the table points at it
  | 'refblock_update'
  | 'reftable_update' // one entry of the current refcount table
  | 'reftable_grow' // the new table and its blocks, before the header switch
  | 'snapshot_update' // reserved: the engine never writes the snapshot table
  // qed
  | 'qed_l1_update'
  | 'qed_l2_alloc'
  | 'qed_l2_update'
  | 'qed_check_repair'; // repairs of a need-check open, and `qmount check --repair`

export const ALL_WRITE_POINTS: readonly IoPoint[] = [
  'header_update', 'data_write', 'cow_write', 'truncate', 'data_punch',
  'l1_update', 'l1_grow', 'l2_alloc', 'l2_update', 'refblock_alloc', 'refblock_update',
  'reftable_update', 'reftable_grow', 'snapshot_update',
  'qed_l1_update', 'qed_l2_alloc', 'qed_l2_update', 'qed_check_repair',
];
