/*
 * The low-level operations. Metadata is answered here from the node table
 * JS set at mount (struct qf_node, built by mount/tree.ts): the tree is fixed
 * (inode 1 the root directory, then every node in table order), so
 * lookup/getattr/readdir/statfs need no JS round trip and FORGET needs no
 * bookkeeping. Data ops go to JS (qf_forward) with the file's inode; JS finds
 * the file by the same number.
 *
 * Rules (the same as the fuse-native backend's, see mount/service.ts):
 * - setattr: a size equal to the file's succeeds here; another size goes to
 *   JS (QF_SETSIZE: the source resizes, JS updates the node with setFile,
 *   the reply carries the attributes, so the kernel learns the new size from
 *   it); EISDIR on a directory, EROFS on a read-only file. mode/owner are
 *   ENOTSUP (they follow from the mount options); times are accepted and
 *   ignored.
 * - st_blocks is the node's blocks, which JS keeps current (guest data
 *   allocated in the chain). The kernel re-asks after every write, fallocate
 *   and setattr (it invalidates the size and times it caches then), so no
 *   notify_inval_inode is needed for these; ATTR_TIMEOUT bounds the rest.
 * - lseek: the kernel sends only SEEK_DATA and SEEK_HOLE (SEEK_SET/CUR/END
 *   it answers itself); those go to JS, anything else is EINVAL.
 * - fallocate: every mode goes to JS, which knows which it supports (the
 *   kernel already refused all but KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE).
 * - open: EISDIR on a directory, EROFS for writing a read-only file;
 *   keep_cache (the page cache stays valid across opens: the file changes
 *   only through this mount) unless another file shows the same bytes
 *   (a partition and disk.raw: then the cache is dropped at every open, and
 *   writes through one invalidate the other's pages, see inval.c), or
 *   direct_io when the mount asked for it.
 * - lookup/readdir: children of a directory in table order; readdir offsets
 *   are 1 ("."), 2 (".."), then 3 + the child's node index.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "qfuse.h"

/* Attributes and entries may be cached this long (mtime changes with writes). */
static const double ATTR_TIMEOUT = 1.0;

static struct qf_session *sess(fuse_req_t req) {
  return (struct qf_session *)fuse_req_userdata(req);
}

static void fill_attr(const struct qf_session *s, fuse_ino_t ino, struct stat *st) {
  const struct qf_node *n = &s->nodes[ino - 1];
  memset(st, 0, sizeof(*st));
  st->st_ino = ino;
  st->st_uid = s->a.uid;
  st->st_gid = s->a.gid;
  st->st_mode = n->mode;
  st->st_nlink = n->nlink;
  if (n->is_dir) {
    st->st_size = 4096;
    st->st_atim = st->st_mtim = st->st_ctim = s->a.start;
  } else {
    st->st_size = (off_t)n->size;
    st->st_blksize = 65536;
    st->st_blocks = (blkcnt_t)n->blocks;
    st->st_atim = st->st_mtim = st->st_ctim = n->mtime;
  }
}

/* The file node of `ino`, or NULL after replying (ENOENT unknown, EISDIR a directory). */
static struct qf_node *file_or_reply(fuse_req_t req, struct qf_session *s, fuse_ino_t ino) {
  struct qf_node *n = qf_node(s, ino);
  if (n == NULL || n->is_dir) {
    fuse_reply_err(req, n == NULL ? ENOENT : EISDIR);
    return NULL;
  }
  return n;
}

static void qf_init(void *userdata, struct fuse_conn_info *conn) {
  struct qf_session *s = userdata;
  /* Many O_DIRECT requests in flight instead of one at a time. */
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  /* Only this mount changes disk.raw: a changed mtime must not drop the page cache. */
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  /* Requests are read into memory buffers (session.c), never spliced; replies from a file splice on their own pipe (filereply.c), not libfuse's. */
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  /* open(O_TRUNC) then arrives as setattr(size 0): EPERM, as on fuse-native (libfuse 3 turns this on). */
  conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;
  /* libfuse clamps max_write to its own buffer size and asks for max_pages to match. */
  conn->max_write = s->a.max_write;
  /* Must equal the max_read mount option (JS passes both; libfuse refuses a mismatch). */
  conn->max_read = s->a.max_read;
  conn->max_readahead = s->a.max_read;
  /* Asynchronous (background) requests in flight: readahead and async DIO. Bounded by the pool. */
  unsigned bg = (unsigned)(s->nslots > 4 ? s->nslots - 2 : 2);
  if (bg > 64) bg = 64;
  conn->max_background = bg;
  conn->congestion_threshold = bg * 3 / 4 > 0 ? bg * 3 / 4 : 1;
}

static void qf_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
  struct qf_session *s = sess(req);
  struct qf_node *p = qf_node(s, parent);
  if (p == NULL || !p->is_dir) {
    fuse_reply_err(req, p == NULL ? ENOENT : ENOTDIR);
    return;
  }
  /* Small trees (a few dozen nodes, QF_MAX_NODES at most): a scan; the kernel caches the entries. */
  for (int i = 1; i < s->nnodes; i++) {
    if (s->nodes[i].parent != parent || strcmp(s->nodes[i].name, name) != 0) continue;
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));
    e.ino = (fuse_ino_t)i + 1;
    e.attr_timeout = ATTR_TIMEOUT;
    e.entry_timeout = ATTR_TIMEOUT;
    fill_attr(s, e.ino, &e.attr);
    fuse_reply_entry(req, &e);
    return;
  }
  fuse_reply_err(req, ENOENT);
}

static void qf_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  (void)ino;
  (void)nlookup;
  fuse_reply_none(req); /* fixed inodes: nothing to count */
}

static void qf_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets) {
  (void)count;
  (void)forgets;
  fuse_reply_none(req);
}

static void qf_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)fi;
  if (qf_node(sess(req), ino) == NULL) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct stat st;
  fill_attr(sess(req), ino, &st);
  fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void qf_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
  (void)fi;
  struct qf_session *s = sess(req);
  struct qf_node *n = qf_node(s, ino);
  if (n == NULL) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    fuse_reply_err(req, ENOTSUP);
    return;
  }
  if (to_set & FUSE_SET_ATTR_SIZE) {
    int err = n->is_dir ? EISDIR : n->read_only ? EROFS : 0;
    if (err) {
      fuse_reply_err(req, err);
      return;
    }
    if ((double)attr->st_size != n->size) {
      /* Times set along with the size are ignored, as they are alone. */
      qf_forward(s, req, ino, QF_SETSIZE, (double)attr->st_size, 0, 0);
      return;
    }
  }
  struct stat st;
  fill_attr(s, ino, &st);
  fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void qf_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  struct qf_node *n = qf_node(sess(req), ino);
  if (n == NULL || !n->is_dir) {
    fuse_reply_err(req, n != NULL ? ENOTDIR : ENOENT);
    return;
  }
  fuse_reply_open(req, fi);
}

static void qf_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  (void)fi;
  struct qf_session *s = sess(req);
  struct qf_node *d = qf_node(s, ino);
  if (d == NULL || !d->is_dir) {
    fuse_reply_err(req, d != NULL ? ENOTDIR : ENOENT);
    return;
  }
  char buf[4096];
  size_t used = 0;
  if (size > sizeof(buf)) size = sizeof(buf);
  /* Entry k (0 ".", 1 "..", then node index i as k = i + 2) has the offset k + 1 of the one after it. */
  for (off_t k = off < 0 ? 0 : off; k < (off_t)s->nnodes + 2; k++) {
    const char *name;
    struct stat st;
    memset(&st, 0, sizeof(st));
    if (k < 2) {
      name = k == 0 ? "." : "..";
      st.st_ino = k == 0 ? ino : d->parent;
      st.st_mode = S_IFDIR;
    } else {
      int i = (int)(k - 2);
      if (i == 0 || s->nodes[i].parent != ino) continue;
      name = s->nodes[i].name;
      st.st_ino = (fuse_ino_t)i + 1;
      st.st_mode = s->nodes[i].mode & S_IFMT;
    }
    size_t need = fuse_add_direntry(req, buf + used, size - used, name, &st, k + 1);
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buf, used);
}

static void qf_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  fuse_reply_err(req, 0);
}

static void qf_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  struct qf_session *s = sess(req);
  struct qf_node *n = file_or_reply(req, s, ino);
  if (n == NULL) return;
  if (n->read_only && (fi->flags & O_ACCMODE) != O_RDONLY) {
    fuse_reply_err(req, EROFS);
    return;
  }
  /* The handle says whether its I/O is direct: polling serves only such clients (struct qf_poll). */
  fi->fh = (fi->flags & O_DIRECT) != 0 ? QF_FH_DIRECT : 0;
  if (s->a.direct_io) fi->direct_io = 1;
  else fi->keep_cache = (unsigned)n->keep_cache;
  fuse_reply_open(req, fi);
}

static void qf_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  fuse_reply_err(req, 0);
}

static void qf_statfs(fuse_req_t req, fuse_ino_t ino) {
  (void)ino;
  struct qf_session *s = sess(req);
  struct statvfs sv;
  memset(&sv, 0, sizeof(sv));
  double blocks = 0; /* disk.raw's size: the first file of the table */
  for (int i = 0; i < s->nnodes; i++) {
    if (!s->nodes[i].is_dir) {
      blocks = (s->nodes[i].size + 4095) / 4096;
      break;
    }
  }
  sv.f_bsize = 4096;
  sv.f_frsize = 4096;
  sv.f_blocks = (fsblkcnt_t)(blocks > 0xffffffffu ? 0xffffffffu : blocks);
  sv.f_files = (fsblkcnt_t)s->nnodes;
  sv.f_namemax = 255;
  fuse_reply_statfs(req, &sv);
}

/* ---- data ops: to JS ---- */

static void qf_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  if (file_or_reply(req, sess(req), ino) == NULL) return;
  sess(req)->poll_state.direct = (fi->fh & QF_FH_DIRECT) != 0;
  if (size > QF_MAX_IO) size = QF_MAX_IO; /* never more than the buffer the reply is built in */
  qf_forward(sess(req), req, ino, QF_READ, (double)off, (double)size, 0);
}

static void qf_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
  struct qf_session *s = sess(req);
  if (file_or_reply(req, s, ino) == NULL) return;
  s->poll_state.direct = (fi->fh & QF_FH_DIRECT) != 0;
  /* The data lies inside the buffer being processed: pass where. */
  const char *base = s->cur_slot >= 0 ? s->slots[s->cur_slot].mem : NULL;
  if (base == NULL || buf < base || buf + size > base + QF_SLOT_SIZE) {
    fuse_reply_err(req, EIO);
    return;
  }
  qf_forward(s, req, ino, QF_WRITE, (double)off, (double)size, (double)(buf - base));
}

static void qf_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)fi;
  if (file_or_reply(req, sess(req), ino) == NULL) return;
  qf_forward(sess(req), req, ino, QF_FLUSH, 0, 0, 0);
}

static void qf_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  (void)fi;
  struct qf_node *n = qf_node(sess(req), ino);
  if (n == NULL || n->is_dir) {
    fuse_reply_err(req, 0);
    return;
  }
  qf_forward(sess(req), req, ino, QF_FSYNC, 0, 0, datasync);
}

void qf_reply_setsize(struct qf_session *s, fuse_req_t req, fuse_ino_t ino) {
  struct stat st;
  fill_attr(s, ino, &st);
  fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void qf_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi) {
  (void)fi;
  if (file_or_reply(req, sess(req), ino) == NULL) return;
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  qf_forward(sess(req), req, ino, QF_LSEEK, (double)off, 0, whence);
}

static void qf_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length, struct fuse_file_info *fi) {
  (void)fi;
  if (file_or_reply(req, sess(req), ino) == NULL) return;
  qf_forward(sess(req), req, ino, QF_FALLOCATE, (double)off, (double)length, mode);
}

const struct fuse_lowlevel_ops qf_ops = {
  .init = qf_init,
  .lookup = qf_lookup,
  .forget = qf_forget,
  .forget_multi = qf_forget_multi,
  .getattr = qf_getattr,
  .setattr = qf_setattr,
  .opendir = qf_opendir,
  .readdir = qf_readdir,
  .releasedir = qf_releasedir,
  .open = qf_open,
  .release = qf_release,
  .statfs = qf_statfs,
  .read = qf_read,
  .write = qf_write,
  .flush = qf_flush,
  .fsync = qf_fsync,
  .lseek = qf_lseek,
  .fallocate = qf_fallocate,
};
