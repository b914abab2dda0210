"""Fashion-MNIST, CIFAR ResNet-18, a longer recipe for an accelerator (RESULTS.md).

    python train.py --config configs/fashion_mnist_resnet18.py --workdir runs/fmnist_r18

The demo's data and transforms (random crop from the image padded by 2, flip), the CIFAR
ResNet-18 in bfloat16 (float32 parameters, optimizer state and bank), batch 256, 20 epochs,
learning rate 0.1 with cosine decay, weight decay 5e-4, temperature 0.05. On a CPU it takes
hours; configs/fashion_mnist.py is the CPU recipe.
"""

from configs import fashion_mnist


def get_config(options: str = ''):
  c = fashion_mnist.get_config(options)
  c.model = 'cifar_resnet18'
  c.dtype = c.nca_matmul_dtype = 'bfloat16'
  c.num_epochs = 20
  c.batch_size = 256
  c.learning_rate = 0.1
  c.lr_schedule = 'cosine'
  c.weight_decay = 5e-4
  c.data.num_threads = 0       # one reader thread per core (arrays in memory: no workers)
  c.knn.batch_size = 2000
  c.log_every_steps = 100
  return c
