"""Your own photos: any tree of DIR/train/<class>/<image> and DIR/val/<class>/<image> (JPEG,
PNG, BMP, TIFF, WebP; any size, grayscale, CMYK or with alpha), ResNet-18 at 224x224 with the
original's ImageNet transforms.

    python train.py --config configs/folder.py --config.data.root=~/photos --workdir runs/photos
    python eval_knn.py --workdir runs/photos

The first run prepares each split once into DIR/snca_prepared (--config.data.prepared_dir to
put it elsewhere); the number of classes is the number of class folders. Smaller images or a
smaller model: --config.data.image_size=112 --config.model=resnet18 (or small_resnet).
"""

from configs import imagenet_resnet18


def get_config():
  c = imagenet_resnet18.get_config('folder')
  c.data.num_classes = 0          # from the class folders
  c.num_epochs = 100
  c.batch_size = 128
  c.lr_schedule = 'cosine'
  c.memory_momentum_steps = ()
  c.knn.batch_size = 256
  c.log_every_steps = 20
  return c
