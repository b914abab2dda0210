"""Neighbour pictures: evaluation images beside their nearest training images, as a PNG grid and
an HTML table, with each class's name where the dataset says it."""

import os

import numpy as np

from snca_jax import knn
from snca_jax.evaluators.knn import Database


def class_names(source, num_classes: int) -> list[str]:
  """Names of the classes where the dataset says them, else their numbers."""
  from snca_jax.data import fashion_mnist
  if getattr(source, 'label_map', None) is not None or getattr(source, 'label_key',
                                                                 'label') != 'label':
    return [str(i) for i in range(num_classes)]                # coarse classes: their numbers
  inner = getattr(source, 'source', source)
  if hasattr(inner, 'classes'):                               # image folders
    return list(inner.classes)
  info = getattr(inner, 'dataset_info', None) or getattr(inner, 'info', None)
  if info is not None and info.name == fashion_mnist.FashionMnistIdx.name:
    return list(fashion_mnist.CLASS_NAMES)
  names = getattr(inner, 'class_names', None)                 # TFDS ClassLabel names
  return list(names) if names else [str(i) for i in range(num_classes)]


class NeighboursEvaluator:
  """Neighbour pictures: for `num_queries` evaluation images (a fixed random choice), their
  `k` nearest training images in the database, with labels and similarities, written as
  `neighbours.png` (a grid: query, then its neighbours, wrong-class ones framed in red) and
  `neighbours.html` (the same as a table) in `out_dir`."""

  def __init__(self, config, out_dir: str, *, num_queries=10, k=10, seed=0, cell=84):
    self.config, self.out_dir = config, out_dir
    self.num_queries, self.k, self.seed, self.cell = num_queries, k, seed, cell

  def _picture(self, record):
    from PIL import Image
    from snca_jax.data import images
    x = images.decode(record['image'], 3) if isinstance(record['image'], bytes) else np.asarray(
        record['image'])
    image = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).convert('RGB')
    image.thumbnail((self.cell, self.cell))
    if image.size != (self.cell, self.cell) and max(image.size) < self.cell:
      scale = self.cell / max(image.size)
      image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                           Image.NEAREST)
    return image

  def run(self, embeddings, database: Database) -> dict:
    import html
    from PIL import Image, ImageDraw
    c = self.config
    evaluated = embeddings.get(c.data.eval_split)
    queries, labels, index = evaluated.features, evaluated.labels, evaluated.index
    pick = np.sort(np.random.default_rng(self.seed).choice(
        len(queries), min(self.num_queries, len(queries)), replace=False))
    sims, rows, nb_labels = knn.nearest(queries[pick], database.features, database.labels,
                                        k=self.k, mesh=embeddings.mesh)
    eval_source = embeddings.source(c.data.eval_split)
    train_source = embeddings.source(c.data.train_split)
    names = class_names(train_source, c.data.num_classes)
    name = lambda y: names[y] if 0 <= y < len(names) else str(y)
    cell, pad, text = self.cell, 4, 26
    grid = Image.new('RGB', ((self.k + 1) * (cell + pad) + pad,
                             len(pick) * (cell + text + pad) + pad), 'white')
    draw = ImageDraw.Draw(grid)
    rows_html = []
    q_records = eval_source.__getitems__([int(index[i]) for i in pick])
    for r, (i, q_record) in enumerate(zip(pick, q_records)):
      y0 = pad + r * (cell + text + pad)
      grid.paste(self._picture(q_record), (pad, y0))
      draw.rectangle((pad - 2, y0 - 2, pad + cell + 1, y0 + cell + 1), outline='black')
      draw.text((pad, y0 + cell + 2), f'query: {name(int(labels[i]))}'[:16], fill='black')
      cells = [f'<td><b>query</b><br>{html.escape(name(int(labels[i])))}</td>']
      neighbours = train_source.__getitems__([int(x) for x in rows[r]])
      for j, rec in enumerate(neighbours):
        x0 = pad + (j + 1) * (cell + pad)
        grid.paste(self._picture(rec), (x0, y0))
        wrong = int(nb_labels[r, j]) != int(labels[i])
        if wrong:
          draw.rectangle((x0 - 2, y0 - 2, x0 + cell + 1, y0 + cell + 1), outline='red',
                         width=3)
        draw.text((x0, y0 + cell + 2), f'{name(int(nb_labels[r, j]))[:10]} {sims[r, j]:.2f}',
                  fill='red' if wrong else 'black')
        label = html.escape(name(int(nb_labels[r, j])))
        cells.append(f'<td{" class=wrong" if wrong else ""}>{label}<br>{sims[r, j]:.3f}</td>')
      rows_html.append('<tr>' + ''.join(cells) + '</tr>')
    os.makedirs(self.out_dir, exist_ok=True)
    grid.save(os.path.join(self.out_dir, 'neighbours.png'))
    with open(os.path.join(self.out_dir, 'neighbours.html'), 'w') as f:
      f.write('<!doctype html><meta charset="utf-8"><title>Nearest neighbours</title>'
              '<style>td{padding:4px;text-align:center;font:12px sans-serif}'
              '.wrong{color:#c00;font-weight:bold}</style>'
              f'<h1>{len(pick)} queries and their {self.k} nearest training images</h1>'
              '<p><img src="neighbours.png" alt="neighbours"></p><table>'
              + ''.join(rows_html) + '</table>')
    wrong = float(np.mean(nb_labels != labels[pick][:, None]))
    return {'neighbours/wrong_fraction': wrong, 'neighbours/num_queries': len(pick)}
