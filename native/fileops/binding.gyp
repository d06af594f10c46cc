{
  "targets": [
    {
      "target_name": "fileops",
      "sources": ["fileops.c"],
      "cflags": ["-Wall", "-Wextra", "-O3"]
    }
  ]
}
