/*
 * Replies from JS to the requests the receive loop handed over (session.c
 * documents reply() and replyFd() with the rest of the module's API): the
 * answer per op, the node times a write or resize moves, and the slot's
 * return to the free list.
 */
#include <time.h>

#include "qfuse.h"

/* Slot `idx` was answered: it is free again (or, answered inside its own dispatch, freed by the receive loop). */
static void answered(struct qf_session *s, int idx) {
  struct qf_slot *sl = &s->slots[idx];
  s->npending--;
  if (idx == s->cur_slot) {
    sl->state = SLOT_BUSY;
    sl->req = NULL;
  } else {
    qf_release_slot(s, idx);
    qf_start_polling(s);
  }
}

napi_value qf_reply(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  struct qf_session *s = argc == 3 ? qf_get_session(env, argv[0]) : NULL;
  int32_t idx;
  double result;
  if (!s || napi_get_value_int32(env, argv[1], &idx) != napi_ok || napi_get_value_double(env, argv[2], &result) != napi_ok) {
    return qf_throw(env, "reply(handle, slot, result)");
  }
  if (s->closed) {
    s->st.late_replies++;
    return NULL;
  }
  if (idx < 0 || idx >= s->nslots || s->slots[idx].state != SLOT_PENDING) return qf_throw(env, "reply: slot is not waiting for a reply");
  struct qf_slot *sl = &s->slots[idx];
  fuse_req_t req = sl->req;
  if (result < 0) {
    fuse_reply_err(req, (int)-result);
  } else {
    switch (sl->op) {
      case QF_READ:
        fuse_reply_buf(req, sl->mem, result > QF_MAX_IO ? QF_MAX_IO : (size_t)result);
        break;
      case QF_WRITE:
        if (result > 0 && qf_node(s, sl->ino) != NULL) clock_gettime(CLOCK_REALTIME, &qf_node(s, sl->ino)->mtime);
        fuse_reply_write(req, (size_t)result);
        break;
      case QF_LSEEK:
        fuse_reply_lseek(req, (off_t)result);
        break;
      case QF_SETSIZE:
        if (qf_node(s, sl->ino) != NULL) clock_gettime(CLOCK_REALTIME, &qf_node(s, sl->ino)->mtime);
        qf_reply_setsize(s, req, sl->ino);
        break;
      case QF_FALLOCATE:
        if (qf_node(s, sl->ino) != NULL) clock_gettime(CLOCK_REALTIME, &qf_node(s, sl->ino)->mtime);
        fuse_reply_err(req, 0);
        break;
      default:
        fuse_reply_err(req, 0);
    }
  }
  answered(s, idx);
  return NULL;
}

/*
 * A read answered from a file instead of the slot's buffer: `length` bytes
 * of descriptor `fd` at `position`, which JS guarantees are all there (below
 * the file's size), spliced into /dev/fuse (filereply.c). Returns 0 when
 * answered, else an errno and the read still waits for reply().
 */
napi_value qf_reply_fd(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  struct qf_session *s = argc == 5 ? qf_get_session(env, argv[0]) : NULL;
  int32_t idx, fd;
  double pos, len;
  if (!s || napi_get_value_int32(env, argv[1], &idx) != napi_ok || napi_get_value_int32(env, argv[2], &fd) != napi_ok ||
      napi_get_value_double(env, argv[3], &pos) != napi_ok || napi_get_value_double(env, argv[4], &len) != napi_ok || fd < 0 || pos < 0 ||
      len < 0 || len > QF_MAX_IO) {
    return qf_throw(env, "replyFd(handle, slot, fd, position, length)");
  }
  napi_value r;
  if (s->closed) {
    s->st.late_replies++; /* dropped, as reply() drops it */
    CHECK(env, napi_create_int32(env, 0, &r));
    return r;
  }
  if (idx < 0 || idx >= s->nslots || s->slots[idx].state != SLOT_PENDING || s->slots[idx].op != QF_READ) {
    return qf_throw(env, "replyFd: slot is not a read waiting for a reply");
  }
  int err = qf_reply_file(s, idx, fd, (off_t)pos, (size_t)len);
  if (err == 0) answered(s, idx);
  CHECK(env, napi_create_int32(env, err, &r));
  return r;
}
