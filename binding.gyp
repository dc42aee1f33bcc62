{
  "targets": [
    {
      "target_name": "ulob_native",
      # One source per concern; SG_IO and device ioctls get their own files.
      "sources": [
        "native/addon.cc",
        "native/io.cc",
        "native/blkdev.cc",
        "native/bitmap.cc",
        "native/process.cc",
        "native/power.cc",
        "native/uloop.cc",
        "native/ublk.cc"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NAPI_DISABLE_CPP_EXCEPTIONS",
        "_FILE_OFFSET_BITS=64",
        "_GNU_SOURCE"
      ],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "cflags_cc": ["-fno-exceptions"],
      "configurations": {
        "Release": {
          # node's common.gypi appends -O3 after our flags; drop it so -O2 holds.
          "cflags!": ["-O3"]
        }
      }
    }
  ]
}
