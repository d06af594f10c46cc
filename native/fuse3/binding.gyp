{
  "targets": [
    {
      "target_name": "qmount_fuse3",
      "sources": ["session.c", "reply.c", "ops.c", "poll.c", "mountwatch.c", "inval.c", "filereply.c"],
      "cflags": ["-Wall", "-Wextra", "-O2", "<!@(pkg-config --cflags fuse3)"],
      "defines": ["NAPI_VERSION=8", "FUSE_USE_VERSION=35", "_GNU_SOURCE"],
      "libraries": ["<!@(pkg-config --libs fuse3)", "-pthread"]
    }
  ]
}
