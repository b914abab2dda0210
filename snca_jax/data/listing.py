"""Listing an image folder split in torchvision `ImageFolder` order, the original's.

The tree is read in torchvision `ImageFolder` order, the original's order: classes are the
sub-directories of the split sorted by name, and within a class the files found by walking it
(`sorted(os.walk(..., followlinks=True))`, then each directory's file names sorted) whose
extension is an image extension (`images.IMG_EXTENSIONS`, case-insensitive); other files
(`.DS_Store`, `Thumbs.db`, a README) are ignored, and so is anything that is not a regular file
once symlinks are followed (a FIFO, a device: a link to /dev/zero), whatever its name; a
dangling symlink is kept, and is a bad file when prepared. Symlinked directories are followed,
but each directory is walked once per class (by device and inode, the first path to it in
sorted order), so a symlink cycle ends. Record `i` is that list's file `i`, so bank row `i` is
the original's row `i`.

Labels are indices into one class list, the training split's: another split (`val`) may lack
some of its classes, but a class folder that the training split does not have is an error.
"""

import os

from snca_jax.data import images
from snca_jax.errors import DataError


def find_classes(split_dir: str) -> list[str]:
  """torchvision's `find_classes`: the sub-directories' names, sorted."""
  try:
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
  except OSError as e:
    raise DataError(f'cannot read the image folder {split_dir} ({e.strerror}): set '
                    f'--config.data.root to a folder holding <split>/<class>/<image> files') from e
  if not classes:
    raise DataError(f'{split_dir} has no class folders: images must be in '
                    f'{split_dir}/<class name>/')
  return classes


def check_classes(split_dir: str, split_classes, classes, train_dir: str | None = None):
  """Raises unless every class folder of the split is one of `classes` (the training split's)."""
  extra = sorted(set(split_classes) - set(classes))
  if extra:
    names = ', '.join(extra[:5]) + (f' and {len(extra) - 5} more' if len(extra) > 5 else '')
    train = f'the training split {train_dir}' if train_dir else 'the training split'
    raise DataError(f'{split_dir} has class folder(s) {names} that {train} does not have, and '
                    f'labels are the training split\'s class indices: add those classes to the '
                    f'training split, or remove them from {split_dir}')


def _walk(top: str) -> list[tuple[str, list[os.DirEntry]]]:
  """`sorted(os.walk(top, followlinks=True))` as (directory, its non-directory entries), but
  each directory once (by (st_dev, st_ino)): one reached again, through a symlink cycle or a
  second link, is not walked again. Sub-directories are walked in sorted order, so which path
  reaches a directory first does not depend on the file system's listing order."""
  seen, out, stack = set(), [], [top]
  while stack:
    directory = stack.pop()
    try:
      st = os.stat(directory)
      if (st.st_dev, st.st_ino) in seen:
        continue
      seen.add((st.st_dev, st.st_ino))
      entries = list(os.scandir(directory))
    except OSError:                   # os.walk skips what it cannot list
      continue
    dirs, files = [], []
    for entry in entries:
      try:
        is_dir = entry.is_dir()         # follows symlinks, as os.walk(followlinks=True)
      except OSError:
        is_dir = False
      (dirs if is_dir else files).append(entry)
    out.append((directory, files))
    stack.extend(os.path.join(directory, e.name) for e in sorted(dirs, key=lambda e: e.name,
                                                                  reverse=True))
  return sorted(out, key=lambda t: t[0])


def _is_file(entry: os.DirEntry) -> bool:
  """A regular file after following symlinks, or a symlink that cannot be followed (kept, to
  be reported as a bad file); not a FIFO, a device or a socket."""
  try:
    if entry.is_file():
      return True
    if not entry.is_symlink():
      return False
    os.stat(entry.path)
    return False                      # a link to something that is not a regular file
  except OSError:
    return True


def list_images(split_dir: str, classes=None) -> list[tuple[str, int]]:
  """(path relative to `split_dir`, index in `classes`) of every image, in ImageFolder order.
  `classes`: the class list to label by (the training split's), default the split's own class
  folders; the split may lack some of them, but may not have others."""
  split_classes = find_classes(split_dir)
  classes = split_classes if classes is None else list(classes)
  check_classes(split_dir, split_classes, classes)
  present = set(split_classes)
  out = []
  for label, name in enumerate(classes):
    if name not in present:
      continue
    for root, files in _walk(os.path.join(split_dir, name)):
      rel = os.path.relpath(root, split_dir)
      out.extend((os.path.join(rel, e.name), label)
                 for e in sorted(files, key=lambda e: e.name)
                 if e.name.lower().endswith(images.IMG_EXTENSIONS) and _is_file(e))
  empty = sorted(present - {classes[label] for _, label in out})
  if empty:
    raise DataError(f'class folder(s) {", ".join(empty[:5])} in {split_dir} hold no image '
                    f'({", ".join(images.IMG_EXTENSIONS)}): add images or remove the folder')
  return out
