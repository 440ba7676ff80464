"""Join a multi-process JAX cluster when there is one: local launcher, TPU VM slice, or none."""

import glob
import os
from collections.abc import Mapping

# Set by `python -m launch.local` in each child's environment.
ENV_COORDINATOR = "LLAMA_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "LLAMA_NUM_PROCESSES"
ENV_PROCESS_ID = "LLAMA_PROCESS_ID"
LAUNCHER_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
LOCAL_SHUTDOWN_TIMEOUT_S = 30

# Set on GKE TPU pods and multi-slice runs; jax's own cluster detection reads them.
_TPU_CLUSTER_VARS = (
  "TPU_WORKER_HOSTNAMES",
  "TPU_PROCESS_ADDRESSES",
  "MEGASCALE_COORDINATOR_ADDRESS",
)
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3 .. 7x). Google's gVNIC shares the vendor id, so the device id
# is what tells a TPU VM from any other GCE VM.
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def launcher_spec(env: Mapping[str, str]) -> tuple[str, int, int] | None:
  """(coordinator_address, num_processes, process_id) from the launcher's variables, or None."""
  present = [k for k in LAUNCHER_VARS if env.get(k)]
  if not present:
    return None
  if len(present) != len(LAUNCHER_VARS):
    missing = ", ".join(k for k in LAUNCHER_VARS if k not in present)
    raise ValueError(
      f"{', '.join(present)} is set but {missing} is not: set all three (python -m launch.local "
      "does) or none."
    )
  try:
    num_processes = int(env[ENV_NUM_PROCESSES])
    process_id = int(env[ENV_PROCESS_ID])
  except ValueError:
    raise ValueError(
      f"{ENV_NUM_PROCESSES}={env[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}="
      f"{env[ENV_PROCESS_ID]!r} must be integers."
    ) from None
  if not 0 <= process_id < num_processes:
    raise ValueError(
      f"{ENV_PROCESS_ID}={process_id} must be in [0, {ENV_NUM_PROCESSES}={num_processes})."
    )
  return env[ENV_COORDINATOR], num_processes, process_id


def launcher_env(
  coordinator_address: str, num_processes: int, process_id: int, devices_per_process: int
) -> dict[str, str]:
  """The variables that make one child of the local launcher host `process_id` of a CPU cluster."""
  return {
    ENV_COORDINATOR: coordinator_address,
    ENV_NUM_PROCESSES: str(num_processes),
    ENV_PROCESS_ID: str(process_id),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
  }


def on_tpu_cluster(env: Mapping[str, str], pci_root: str = "/sys/bus/pci/devices") -> bool:
  """Whether this host is a Cloud TPU VM (or TPU pod on GKE), where jax finds its peers itself."""
  if any(env.get(k) for k in _TPU_CLUSTER_VARS):
    return True
  for vendor_path in glob.glob(os.path.join(pci_root, "*", "vendor")):
    try:
      with open(vendor_path) as f:
        vendor = f.read().strip()
      if vendor != _GOOGLE_PCI_VENDOR:
        continue
      with open(os.path.join(os.path.dirname(vendor_path), "device")) as f:
        if f.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def maybe_initialize() -> None:
  """Call `jax.distributed.initialize` when this process is one host of several; else nothing.

  Call it first, before anything else touches JAX devices. Calling it again is a no-op.
  """
  # Imported here so that the launcher can read the variable names above without loading JAX.
  import jax

  if jax.distributed.is_initialized():
    return
  spec = launcher_spec(os.environ)
  if spec is not None:
    coordinator_address, num_processes, process_id = spec
    platforms = (jax.config.jax_platforms or "cpu").split(",")
    if "cpu" in platforms:
      # CPU devices have no cross-process collectives unless gloo is chosen before the backend
      # starts; on GPU or TPU this setting is unused.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      # A process that exits while a peer still runs waits this long for it (jax's default is
      # 300 s); a crashed simulated host should stop the run in seconds, not minutes.
      shutdown_timeout_seconds=LOCAL_SHUTDOWN_TIMEOUT_S,
    )
  elif on_tpu_cluster(os.environ):
    # Every worker of a TPU slice runs this; jax reads the peers from the VM metadata (and the
    # MEGASCALE_* values for multi-slice). On a one-host slice this forms a cluster of one.
    jax.distributed.initialize()
