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
  // qcow2
  | 'l1_update'
  | 'l1_grow' // a new, larger L1 table written before the header points at it (resize)
  | 'l1_switch' // the header's l1_size + l1_table_offset switched to the new L1 table (one write)
  | 'header_resize' // the header's guest size field (resize)
  | 'zero_write' // zeros written in place for a write-zeroes request (no zero flag, or a partial unit)
  | 'punch_hole' // a freed range punched out of the image file (ImageFile.punchHole)
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
  'header_update', 'data_write', 'cow_write', 'truncate',
  'l1_update', 'l1_grow', 'l1_switch', 'header_resize', 'zero_write', 'punch_hole', 'l2_alloc', 'l2_update', 'refblock_alloc', 'refblock_update',
  'reftable_update', 'reftable_grow', 'snapshot_update',
  'qed_l1_update', 'qed_l2_alloc', 'qed_l2_update', 'qed_check_repair',
];
