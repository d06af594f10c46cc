/*
 * Answering a read from a file (replyFd): the bytes go from the image
 * file's page cache to /dev/fuse with one copy, by the kernel, instead of
 * two (a pread into our buffer, then the writev of the reply out of it).
 *
 * How: the reply's header is written into a pipe of this session, the
 * file's pages are spliced in after it (page references, no copy), and the
 * pipe is spliced into /dev/fuse, where the kernel copies the pages into the
 * reader's. The kernel takes a reply from a pipe only whole
 * (fuse_dev_splice_write), so the header's buffer and every page the range
 * touches must fit in the pipe at once: the pipe is grown as far as
 * /proc/sys/fs/pipe-max-size lets it (1 MiB unless raised; beyond it needs
 * CAP_SYS_RESOURCE), 256 pages, so a 1 MiB read (257 pipe buffers) is not
 * answered here but by the pread path (QF_FILE_REPLY_MAX tells JS the
 * largest size that always fits).
 * Our own pipe and splice, not libfuse's fuse_reply_data: that one splices
 * the file with SPLICE_F_NONBLOCK, which on current kernels fails with
 * EAGAIN for pages not in the page cache, and after one EAGAIN libfuse stops
 * splicing for the rest of the session, falling back to malloc + pread +
 * writev per reply (buffered reads 0.73x of plain pread, measured). Ours
 * blocks like the pread it replaces (JS calls it only when InlinePolicy lets
 * a read run inline); the pipe is in blocking mode for that reason and
 * cannot block on space, because the fit is checked first.
 * When reading the file (or sending) fails nothing is sent: the errno goes
 * back to JS, which answers the read through its ordinary path (and so
 * meets, logs and answers a read error there).
 * The request's unique id, which the reply header needs and libfuse keeps
 * to itself, is read from the request's fuse_in_header when it is handed to
 * JS (qf_forward); after our own reply libfuse's request is freed with
 * fuse_reply_none, which sends nothing.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "qfuse.h"

#define PAGE 4096

void qf_pipe_open(struct qf_session *s) {
  s->pipe_fd[0] = s->pipe_fd[1] = -1;
  s->pipe_pages = 0;
  if (pipe2(s->pipe_fd, O_CLOEXEC) != 0) return;
  /*
   * The kernel rounds a pipe's size up to a power of two pages and refuses
   * one above pipe-max-size: from 2 MiB (a 1 MiB reply, its header and a
   * misaligned start) down until one is granted; the default 64 KiB stays.
   */
  for (int want = 2 * QF_MAX_IO; want > 16 * PAGE; want /= 2) {
    if (fcntl(s->pipe_fd[1], F_SETPIPE_SZ, want) >= 0) break;
  }
  int size = fcntl(s->pipe_fd[1], F_GETPIPE_SZ);
  s->pipe_pages = size > 0 ? size / PAGE : 0;
}

void qf_pipe_close(struct qf_session *s) {
  for (int i = 0; i < 2; i++) {
    if (s->pipe_fd[i] >= 0) close(s->pipe_fd[i]);
    s->pipe_fd[i] = -1;
  }
  s->pipe_pages = 0;
}

/* After a failed splice the pipe may hold part of a reply: start again with a new one. */
static void pipe_reset(struct qf_session *s) {
  int n = 0;
  if (s->pipe_fd[0] >= 0 && ioctl(s->pipe_fd[0], FIONREAD, &n) == 0 && n == 0) return;
  qf_pipe_close(s);
  qf_pipe_open(s);
}

/*
 * 0: sent (or the kernel no longer wants it: ENOENT, interrupted and
 * answered; ENODEV, unmounted). Else an errno and, as far as we can tell,
 * nothing was sent; JS then answers the read the ordinary way (should the
 * kernel have ended the request after all, that answer gets ENOENT and is
 * dropped, as for an interrupted request).
 */
static int reply_spliced(struct qf_session *s, uint64_t unique, int fd, off_t pos, size_t len) {
  struct fuse_out_header h = {.len = (uint32_t)(sizeof(h) + len), .error = 0, .unique = unique};
  if (write(s->pipe_fd[1], &h, sizeof(h)) != (ssize_t)sizeof(h)) {
    s->st.file_send_errors++;
    pipe_reset(s);
    return EIO;
  }
  loff_t off = pos;
  size_t left = len;
  while (left > 0) {
    ssize_t n = splice(fd, &off, s->pipe_fd[1], NULL, left, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = n == 0 ? EIO : errno; /* 0: end of file, which JS rules out (ImageFile.sendNow) */
      s->st.file_read_errors++;
      /* The file's file system cannot splice: not again in this session (every read would fail the same way). */
      if (err == EINVAL || err == ENOSYS || err == EOPNOTSUPP) s->splice_off = 1;
      pipe_reset(s);
      return err;
    }
    left -= (size_t)n;
  }
  ssize_t n;
  do n = splice(s->pipe_fd[0], NULL, s->fd, NULL, h.len, 0);
  while (n < 0 && errno == EINTR);
  if (n == (ssize_t)h.len) return 0;
  int err = n < 0 ? errno : EIO;
  pipe_reset(s);
  if (err == ENOENT || err == ENODEV) return 0;
  s->st.file_send_errors++;
  return err;
}

int qf_reply_file(struct qf_session *s, int idx, int fd, off_t pos, size_t len) {
  struct qf_slot *sl = &s->slots[idx];
  size_t first = (size_t)pos & ~(size_t)(PAGE - 1);
  size_t pages = ((size_t)pos + len - first + PAGE - 1) / PAGE;
  if (s->splice_off) return EOPNOTSUPP;
  if (len == 0 || s->pipe_pages == 0 || pages + 1 > (size_t)s->pipe_pages) return EMSGSIZE;
  int err = reply_spliced(s, sl->unique, fd, pos, len);
  if (err != 0) return err;
  s->st.file_replies++;
  fuse_reply_none(sl->req); /* answered above: free libfuse's request, send nothing */
  return 0;
}
