/*
 * Dropping cached pages of files that show the same bytes (a partition
 * file and disk.raw): after a write through one, the overlapping pages of
 * the others are invalidated with FUSE_NOTIFY_INVAL_INODE. See inval.c.
 */
#ifndef QF_INVAL_H
#define QF_INVAL_H

#include <stdint.h>

struct qf_inval;

/* A queue for a session with `nnodes` inodes (1..nnodes) on `fuse_fd` (dup'ed). NULL on failure. */
struct qf_inval *qf_inval_new(int fuse_fd, int nnodes);
/* Queue [off, off + len) of inode `ino` (merged with what is queued for it). 0, or -1 (bad inode). */
int qf_inval_queue(struct qf_inval *q, uint64_t ino, double off, double len);
/* Notifications sent / refused by the kernel (e.g. ENOENT: the inode has no cache). */
void qf_inval_counts(struct qf_inval *q, double *sent, double *failed);
/* Stop the thread (after what it is writing now) and release the queue: q is not used after. */
void qf_inval_stop(struct qf_inval *q);

#endif
