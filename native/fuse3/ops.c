/*
 * The low-level operations. Metadata is answered here from the attributes
 * JS set at mount (struct qf_attrs): the tree is fixed (inode 1 the root
 * directory, inode 2 disk.raw), so lookup/getattr/readdir/statfs need no JS
 * round trip and FORGET needs no bookkeeping. Data ops go to JS (qf_forward).
 *
 * Rules (the same as the fuse-native backend's, see mount/service.ts):
 * - setattr: a size equal to the disk's succeeds here; another size goes to
 *   JS (QF_SETSIZE: the driver resizes, JS updates the attributes, the reply
 *   carries them, so the kernel learns the new size from it); EISDIR on the
 *   directory, EROFS on a read-only mount. mode/owner are ENOTSUP (they
 *   follow from the mount options); times are accepted and ignored.
 * - st_blocks is attrs.blocks, which JS keeps current (guest data allocated
 *   in the chain). The kernel re-asks after every write, fallocate and
 *   setattr (it invalidates the size and times it caches then), so no
 *   notify_inval_inode is needed for these; ATTR_TIMEOUT bounds the rest.
 * - lseek: the kernel sends only SEEK_DATA and SEEK_HOLE (SEEK_SET/CUR/END
 *   it answers itself); those go to JS, anything else is EINVAL.
 * - fallocate: every mode goes to JS, which knows which it supports (the
 *   kernel already refused all but KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE).
 * - open: EROFS for writing on a read-only mount; keep_cache (the page cache
 *   stays valid across opens: disk.raw changes only through this mount),
 *   or direct_io when the mount asked for it.
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
  memset(st, 0, sizeof(*st));
  st->st_ino = ino;
  st->st_uid = s->a.uid;
  st->st_gid = s->a.gid;
  if (ino == QF_ROOT_INO) {
    st->st_mode = s->a.dir_mode;
    st->st_nlink = 2;
    st->st_size = 4096;
    st->st_atim = st->st_mtim = st->st_ctim = s->a.start;
  } else {
    st->st_mode = s->a.file_mode;
    st->st_nlink = 1;
    st->st_size = (off_t)s->a.size;
    st->st_blksize = 65536;
    st->st_blocks = (blkcnt_t)s->a.blocks;
    st->st_atim = st->st_mtim = st->st_ctim = s->a.mtime;
  }
}

static void qf_init(void *userdata, struct fuse_conn_info *conn) {
  struct qf_session *s = userdata;
  /* Many O_DIRECT requests in flight instead of one at a time. */
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  /* Only this mount changes disk.raw: a changed mtime must not drop the page cache. */
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  /* Requests are read into memory buffers (session.c), never spliced. */
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
  if (parent != QF_ROOT_INO || strcmp(name, QF_FILE_NAME) != 0) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct fuse_entry_param e;
  memset(&e, 0, sizeof(e));
  e.ino = QF_FILE_INO;
  e.attr_timeout = ATTR_TIMEOUT;
  e.entry_timeout = ATTR_TIMEOUT;
  fill_attr(s, QF_FILE_INO, &e.attr);
  fuse_reply_entry(req, &e);
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

static int known(fuse_ino_t ino) {
  return ino == QF_ROOT_INO || ino == QF_FILE_INO;
}

static void qf_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)fi;
  if (!known(ino)) {
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
  if (!known(ino)) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    fuse_reply_err(req, ENOTSUP);
    return;
  }
  if (to_set & FUSE_SET_ATTR_SIZE) {
    int err = ino == QF_ROOT_INO ? EISDIR : s->a.read_only ? EROFS : 0;
    if (err) {
      fuse_reply_err(req, err);
      return;
    }
    if ((double)attr->st_size != s->a.size) {
      /* Times set along with the size are ignored, as they are alone. */
      if (s->cur_slot >= 0) s->slots[s->cur_slot].ino = ino;
      qf_forward(s, req, QF_SETSIZE, (double)attr->st_size, 0, 0);
      return;
    }
  }
  struct stat st;
  fill_attr(s, ino, &st);
  fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void qf_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  if (ino != QF_ROOT_INO) {
    fuse_reply_err(req, known(ino) ? ENOTDIR : ENOENT);
    return;
  }
  fuse_reply_open(req, fi);
}

static void qf_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  (void)fi;
  if (ino != QF_ROOT_INO) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  static const struct {
    const char *name;
    fuse_ino_t ino;
    mode_t mode;
  } entries[] = {{".", QF_ROOT_INO, S_IFDIR}, {"..", QF_ROOT_INO, S_IFDIR}, {QF_FILE_NAME, QF_FILE_INO, S_IFREG}};
  char buf[512];
  size_t used = 0;
  if (size > sizeof(buf)) size = sizeof(buf);
  for (off_t i = off; i < 3; i++) {
    struct stat st;
    memset(&st, 0, sizeof(st));
    st.st_ino = entries[i].ino;
    st.st_mode = entries[i].mode;
    size_t need = fuse_add_direntry(req, buf + used, size - used, entries[i].name, &st, i + 1);
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
  if (ino != QF_FILE_INO) {
    fuse_reply_err(req, ino == QF_ROOT_INO ? EISDIR : ENOENT);
    return;
  }
  if (s->a.read_only && (fi->flags & O_ACCMODE) != O_RDONLY) {
    fuse_reply_err(req, EROFS);
    return;
  }
  fi->fh = 0;
  if (s->a.direct_io) fi->direct_io = 1;
  else fi->keep_cache = 1;
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
  double blocks = (s->a.size + 4095) / 4096;
  sv.f_bsize = 4096;
  sv.f_frsize = 4096;
  sv.f_blocks = (fsblkcnt_t)(blocks > 0xffffffffu ? 0xffffffffu : blocks);
  sv.f_files = 2;
  sv.f_namemax = 255;
  fuse_reply_statfs(req, &sv);
}

/* ---- data ops: to JS ---- */

static void qf_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  (void)fi;
  if (ino != QF_FILE_INO) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  if (size > QF_MAX_IO) size = QF_MAX_IO; /* never more than the buffer the reply is built in */
  qf_forward(sess(req), req, QF_READ, (double)off, (double)size, 0);
}

static void qf_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
  (void)fi;
  struct qf_session *s = sess(req);
  if (ino != QF_FILE_INO) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  /* The data lies inside the buffer being processed: pass where. */
  const char *base = s->cur_slot >= 0 ? s->slots[s->cur_slot].mem : NULL;
  if (base == NULL || buf < base || buf + size > base + QF_BUF_SIZE) {
    fuse_reply_err(req, EIO);
    return;
  }
  qf_forward(s, req, QF_WRITE, (double)off, (double)size, (double)(buf - base));
}

static void qf_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  qf_forward(sess(req), req, QF_FLUSH, 0, 0, 0);
}

static void qf_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  (void)fi;
  if (ino != QF_FILE_INO) {
    fuse_reply_err(req, 0);
    return;
  }
  qf_forward(sess(req), req, QF_FSYNC, 0, 0, datasync);
}

void qf_reply_setsize(struct qf_session *s, fuse_req_t req, fuse_ino_t ino) {
  struct stat st;
  fill_attr(s, ino, &st);
  fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void qf_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi) {
  (void)fi;
  if (ino != QF_FILE_INO) {
    fuse_reply_err(req, ino == QF_ROOT_INO ? EISDIR : ENOENT);
    return;
  }
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  qf_forward(sess(req), req, QF_LSEEK, (double)off, 0, whence);
}

static void qf_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length, struct fuse_file_info *fi) {
  (void)fi;
  if (ino != QF_FILE_INO) {
    fuse_reply_err(req, ino == QF_ROOT_INO ? EISDIR : ENOENT);
    return;
  }
  qf_forward(sess(req), req, QF_FALLOCATE, (double)off, (double)length, mode);
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
