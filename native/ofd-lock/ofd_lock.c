/*
 * ofd_lock: the two fcntl(2) calls qmount needs and Node does not offer.
 *
 *   setLock(fd, start, length, type) -> 0 or -errno
 *     F_OFD_SETLK: take (type 1 read, 2 write) or release (type 0) a
 *     byte-range lock owned by the open file description of fd. Never waits.
 *   testLock(fd, start, length, type) -> 0 (no conflict), 1 (a conflicting
 *     read lock), 2 (a conflicting write lock), or -errno
 *     F_OFD_GETLK: would a lock of `type` conflict with one held through
 *     another open file description (any process, this one included)?
 *
 * Open-file-description locks (Linux >= 3.15) are what QEMU uses on image
 * files; they belong to the file description, not the process, so closing
 * another descriptor of the same file does not drop them (unlike classic
 * POSIX locks), and they vanish when the last descriptor is closed, also
 * when the process is killed.
 *
 * Errors are returned, not thrown, so the JavaScript side decides what a
 * conflict (EAGAIN/EACCES) or an unsupported file system (EINVAL, ENOLCK,
 * EOPNOTSUPP) means.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <node_api.h>

#ifndef F_OFD_SETLK
#error "F_OFD_SETLK is missing: open file description locks need Linux >= 3.15 and glibc >= 2.20"
#endif

static int read_args(napi_env env, napi_callback_info info, int *fd, int64_t *start, int64_t *len, int *type) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 4) return -EINVAL;
  int32_t f, t;
  if (napi_get_value_int32(env, argv[0], &f) != napi_ok) return -EINVAL;
  if (napi_get_value_int64(env, argv[1], start) != napi_ok) return -EINVAL;
  if (napi_get_value_int64(env, argv[2], len) != napi_ok) return -EINVAL;
  if (napi_get_value_int32(env, argv[3], &t) != napi_ok) return -EINVAL;
  if (f < 0 || *start < 0 || *len < 0 || t < 0 || t > 2) return -EINVAL;
  *fd = f;
  *type = t;
  return 0;
}

static short lock_type(int type) {
  return type == 0 ? F_UNLCK : type == 1 ? F_RDLCK : F_WRLCK;
}

static napi_value result(napi_env env, int value) {
  napi_value out;
  napi_create_int32(env, value, &out);
  return out;
}

static napi_value set_lock(napi_env env, napi_callback_info info) {
  int fd, type;
  int64_t start, len;
  int rc = read_args(env, info, &fd, &start, &len, &type);
  if (rc) return result(env, rc);
  struct flock fl;
  memset(&fl, 0, sizeof fl); /* l_pid must be 0 for OFD locks */
  fl.l_type = lock_type(type);
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  int r;
  do {
    r = fcntl(fd, F_OFD_SETLK, &fl);
  } while (r == -1 && errno == EINTR);
  return result(env, r == -1 ? -errno : 0);
}

static napi_value test_lock(napi_env env, napi_callback_info info) {
  int fd, type;
  int64_t start, len;
  int rc = read_args(env, info, &fd, &start, &len, &type);
  if (rc) return result(env, rc);
  if (type == 0) return result(env, -EINVAL);
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = lock_type(type);
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  int r;
  do {
    r = fcntl(fd, F_OFD_GETLK, &fl);
  } while (r == -1 && errno == EINTR);
  if (r == -1) return result(env, -errno);
  if (fl.l_type == F_UNLCK) return result(env, 0);
  return result(env, fl.l_type == F_RDLCK ? 1 : 2);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"setLock", NULL, set_lock, NULL, NULL, NULL, napi_default, NULL},
    {"testLock", NULL, test_lock, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
