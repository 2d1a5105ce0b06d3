"""What each capture in tests/fixtures/gpu/ must parse to, written by hand from the capture text.

Every number below was read off the capture file (memory as the MiB the tool printed times MIB, so
the line can be checked against the file by eye); none was copied from the parser's output.
Commands, exit statuses and streams come from tests/fixtures/gpu/SOURCES.md; where SOURCES.md says
the source did not show them, the value used is named in ``note``.

``test_telemetry_captures.py`` fails when a capture has no row here or a row names a missing file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1048576

# For the header captures the --query-gpu list is exactly the header's field names (SOURCES.md: "fields
# inferred from the header" / "full command line in the capture's section header"); the test fills it in.
HEADER_QUERY = "nvidia-smi --query-gpu={header} --format=csv"
HEADER_QUERY_NOUNITS = "nvidia-smi --query-gpu={header} --format=csv,nounits"

TELEGRAF_CMD = (
    "rocm-smi -o -l -m -M -g -c -t -u -i -f -p -P -s -S -v --showreplaycount --showpids --showdriverversion "
    "--showmemvendor --showfwinfo --showproductname --showserial --showuniqueid --showbus --showpendingpages "
    "--showpagesinfo --showmeminfo all --showretiredpages --showunreservablepages --showmemuse --showvoltage "
    "--showtopo --showtopoweight --showtopohops --showtopotype --showtoponuma --json"
)
COMPUTE_APPS_CMD = "nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv"
MASKED_UUID = "GPU-00000000-0000-0000-0000-000000000000"
RTX2080S = "NVIDIA GeForce RTX 2080 SUPER"
RTX2080S_UUID = "GPU-df6e7a7c-7314-46f8-abc4-b88b36dcf3aa"
RX6700XT = "Navi 22 [Radeon RX 6700/6700 XT / 6800M]"
MI100 = "Arcturus GL-XL [Instinct MI100]"


@dataclass(frozen=True)
class Gpu:
    """One GPU as the snapshot must show it. Every standard key is asserted; None means null."""

    index: int | None
    name: str | None
    total: int | None
    used: int | None
    free: int | None
    util: int | float | None = None
    temp: int | float | None = None
    power: float | None = None
    uuid: str | None = None
    health: str = "ok"
    fields: dict = field(default_factory=dict)   # a few `fields` entries worth checking (None = null)


@dataclass(frozen=True)
class Capture:
    cmd: str
    backend: str
    gpus: tuple = ()
    rc: int = 0
    stream: str = "stdout"                    # where the capture's text was printed
    reason: str | None = None                 # for failure captures
    msg_has: tuple = ()                       # substrings the failure message must contain
    note: str = ""


def _a800(index: int, free_mib: int) -> Gpu:
    return Gpu(index, "NVIDIA A800-SXM4-80GB", 81920 * MIB, (81920 - free_mib) * MIB, free_mib * MIB,
               fields={"driver_version": "580.95.05", "compute_cap": "8.0"})


def _mi300_row(index: int, power: float, temp: int, used_mib: int) -> Gpu:
    return Gpu(index, None, 196300 * MIB, used_mib * MIB, (196300 - used_mib) * MIB, util=0, temp=temp,
               power=power, fields={"MEM_CLOCK": "900 MHz", "GFX_CLOCK": "114 MHz" if index == 0 else "113 MHz"})


def _mi100(index: int, uuid: str | None, temp: float, power: float, used: int) -> Gpu:
    return Gpu(index, MI100, 34342961152, used, 34342961152 - used, util=0, temp=temp, power=power, uuid=uuid)


EXPECTATIONS: dict[str, Capture] = {
    # ------------------------------------------------------------------ nvidia, with header
    "nvidia/csv-header-115fields-1xRTX2080SUPER-linux-465.27.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, RTX2080S, 7979 * MIB, 344 * MIB, 7635 * MIB, util=0, temp=32, power=30.37,
                                     uuid=RTX2080S_UUID,
                                     fields={"serial": None, "temperature.memory": None, "pstate": "P8"}),)),
    "nvidia/csv-header-115fields-1xRTX2080SUPER-win10-466.63.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, RTX2080S, 8192 * MIB, 856 * MIB, 7336 * MIB, util=0, temp=35, power=31.12,
                                     uuid=RTX2080S_UUID),)),
    "nvidia/csv-header-115fields-1xRTX2080SUPER-windows-471.11.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, RTX2080S, 8192 * MIB, 876 * MIB, 7316 * MIB, util=2, temp=36, power=32.70,
                                     uuid=RTX2080S_UUID),)),
    "nvidia/csv-header-allfields-1xH100-80GB-HBM3-linux-590.48.01-idle.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, "NVIDIA H100 80GB HBM3", 81559 * MIB, 0, 81081 * MIB, util=0, temp=41,
                                     power=69.85, uuid=MASKED_UUID,
                                     fields={"memory.reserved": "479 MiB", "display_mode": None,
                                             "mig.mode.current": "Disabled"}),)),
    "nvidia/csv-header-allfields-1xH100-MIG-enabled-linux-590.48.01-load.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, "NVIDIA H100 80GB HBM3", 81559 * MIB, 11125 * MIB, 69956 * MIB, util=None,
                                     temp=53, power=433.78, uuid=MASKED_UUID,
                                     fields={"mig.mode.current": "Enabled", "utilization.gpu": None}),)),
    "nvidia/csv-header-allfields-1xH200-MIG-enabled-linux-590.48.01-idle.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, "NVIDIA H200", 143771 * MIB, 55 * MIB, 143103 * MIB, util=None, temp=28,
                                     power=78.28, uuid=MASKED_UUID, fields={"mig.mode.current": "Enabled"}),)),
    "nvidia/csv-header-allfields-1xH200-linux-590.48.01-load.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, "NVIDIA H200", 143771 * MIB, 32362 * MIB, 110796 * MIB, util=100, temp=52,
                                     power=627.40, uuid=MASKED_UUID),)),
    "nvidia/csv-header-allfields-1xL40S-linux-595.80-idle.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, "NVIDIA L40S", 46068 * MIB, 0, 45460 * MIB, util=100, temp=63, power=144.97,
                                     uuid=MASKED_UUID, fields={"temperature.memory": None}),)),
    "nvidia/csv-header-allfields-1xRTX2080SUPER-linux-595.71.05-idle.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, RTX2080S, 8192 * MIB, 214 * MIB, 7571 * MIB, util=0, temp=40, power=39.32,
                                     uuid=MASKED_UUID, fields={"platform.chassis_serial_number": None}),)),
    "nvidia/csv-header-allfields-1xRTX2080SUPER-linux-610.57.04-idle.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, RTX2080S, 8192 * MIB, 211 * MIB, 7582 * MIB, util=0, temp=33, power=39.17,
                                     uuid=MASKED_UUID),)),
    "nvidia/csv-header-allfields-1xRTX2080SUPER-windows-591.86-idle.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, RTX2080S, 8192 * MIB, 702 * MIB, 7286 * MIB, util=0, temp=40, power=38.92,
                                     uuid=MASKED_UUID),)),
    "nvidia/csv-header-allfields-1xRTX2080SUPER-windows-610.62-idle.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, RTX2080S, 8192 * MIB, 797 * MIB, 7191 * MIB, util=0, temp=40, power=39.25,
                                     uuid=MASKED_UUID, fields={"bbx.time_run": None}),)),
    "nvidia/csv-header-allfields-1xRTX4080SUPER-linux-595.71.05-idle.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, "NVIDIA GeForce RTX 4080 SUPER", 16376 * MIB, 596 * MIB, 15348 * MIB, util=0,
                                     temp=43, power=26.20, uuid=MASKED_UUID),)),
    "nvidia/csv-header-index-name-memtotal-memfree-2xRTX4070Laptop-RTX5070Ti-windows.txt": Capture(
        HEADER_QUERY, "nvidia", (
            Gpu(0, "NVIDIA GeForce RTX 4070 Laptop GPU", 8188 * MIB, (8188 - 7948) * MIB, 7948 * MIB),
            Gpu(1, "NVIDIA GeForce RTX 5070 Ti", 16303 * MIB, (16303 - 15799) * MIB, 15799 * MIB),
        )),
    "nvidia/csv-header-index-name-memtotal-memfree-driver-computecap-8xA800-SXM4-80GB.txt": Capture(
        HEADER_QUERY, "nvidia", (
            _a800(0, 8404), _a800(1, 12549), _a800(2, 12459), _a800(3, 12549),
            _a800(4, 67547), _a800(5, 81148), _a800(6, 81032), _a800(7, 65326),
        )),
    "nvidia/csv-header-index-name-memused-memtotal-util-2xRTX4070Laptop-RTX5070Ti-windows.txt": Capture(
        HEADER_QUERY, "nvidia", (
            Gpu(0, "NVIDIA GeForce RTX 4070 Laptop GPU", 8188 * MIB, 0, 8188 * MIB, util=0),
            Gpu(1, "NVIDIA GeForce RTX 5070 Ti", 16303 * MIB, 4537 * MIB, (16303 - 4537) * MIB, util=73),
        )),
    "nvidia/csv-header-index-temp-util-memused-1xH100-GPU-requires-reset.txt": Capture(
        HEADER_QUERY, "nvidia",
        (Gpu(0, None, None, 0, None, util=None, temp=None, health="GPU requires reset",
             fields={"temperature.gpu": None, "utilization.gpu": None, "memory.used": "0 MiB"}),),
        note="exit status not recorded by the note; nvidia-smi printed its rows, so 0 is assumed"),
    "nvidia/csv-header-index-temp-util-memused-1xH100-healthy.txt": Capture(
        HEADER_QUERY, "nvidia", (Gpu(0, None, None, 80620 * MIB, None, util=100, temp=74),)),
    "nvidia/csv-header-query-compute-apps-1xH100-MIG-enabled-linux-590.48.01-load.txt": Capture(
        "nvidia-smi --query-compute-apps=timestamp,gpu_name,gpu_bus_id,gpu_serial,gpu_uuid,pid,process_name,"
        "used_gpu_memory --format=csv",
        "nvidia", reason="unparseable", msg_has=("process list", "--query-gpu=")),
    "nvidia/csv-header-query-compute-apps-1proc-1xH200-linux-580.159.04-load.txt": Capture(
        COMPUTE_APPS_CMD, "nvidia", reason="unparseable", msg_has=("process list", "--query-gpu="),
        note="one process holding 42180 MiB: a process list, whatever its numbers"),
    "nvidia/csv-header-query-compute-apps-none-1xH200-linux-580.159.04.txt": Capture(
        COMPUTE_APPS_CMD, "nvidia", reason="unparseable", msg_has=("process list", "--query-gpu="),
        note="the header alone (no process running)"),
    "nvidia/csv-nounits-header-15fields-1xTeslaP100-PCIE-16GB.txt": Capture(
        HEADER_QUERY_NOUNITS, "nvidia",
        (Gpu(None, "Tesla P100-PCIE-16GB", None, 0, 16280 * MIB, util=0, temp=37, power=28.16,
             uuid="GPU-ef1b2c9b-38d8-2090-2bd1-f567a3eb42a6",
             fields={"fan.speed": None, "memory.reserved": "103", "pstate": "P0"}),),
        note="no index and no memory.total in this query: both stay null"),
    # ------------------------------------------------------------------ nvidia, noheader
    "nvidia/csv-noheader-12fields-1xGTX770-windows-NotSupported.txt": Capture(
        "./nvidia-smi.exe --query-gpu=gpu_name,utilization.gpu,utilization.memory,temperature.gpu,power.draw,"
        "power.limit,fan.speed,pstate,clocks.current.graphics,clocks.current.memory,power.max_limit,"
        "power.default_limit --format=csv,noheader",
        "nvidia",
        (Gpu(None, "GeForce GTX 770", None, None, None, util=None, temp=52, power=None,
             fields={"name": "GeForce GTX 770", "fan.speed": "52 %", "pstate": "P0", "power.limit": None,
                     "utilization.memory": None}),)),
    "nvidia/csv-noheader-name-pcideviceid-1xH100-NVL.txt": Capture(
        "nvidia-smi --query-gpu=name,pci.device_id --format=csv,noheader", "nvidia",
        (Gpu(None, "NVIDIA H100 NVL", None, None, None, fields={"pci.device_id": "0x232110DE"}),)),
    "nvidia/csv-noheader-nounits-mem-temp-fan-util-1xGPU-fan-NA.txt": Capture(
        "nvidia-smi --query-gpu=memory.total,memory.free,memory.used,temperature.gpu,fan.speed,utilization.gpu,"
        "utilization.memory --format=csv,noheader,nounits", "nvidia",
        (Gpu(None, None, 2004 * MIB, 0, 2004 * MIB, util=0, temp=44, fields={"fan.speed": None}),)),
    "nvidia/csv-noheader-nounits-mem-temp-fan-util-1xGPU-fan-NotSupported-olddriver.txt": Capture(
        "nvidia-smi --query-gpu=memory.total,memory.free,memory.used,temperature.gpu,fan.speed,utilization.gpu,"
        "utilization.memory --format=csv,noheader,nounits", "nvidia",
        (Gpu(None, None, 2004 * MIB, 0, 2004 * MIB, util=0, temp=44, fields={"fan.speed": None}),)),
    "nvidia/csv-noheader-temperature-gpu-id0.txt": Capture(
        "nvidia-smi --format=csv,noheader --id=0 --query-gpu=temperature.gpu", "nvidia",
        (Gpu(None, None, None, None, None, temp=32),)),
    "nvidia/csv-noheader-utilization-gpu-1xGPU.txt": Capture(
        "nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader", "nvidia",
        (Gpu(None, None, None, None, None, util=1),)),
    # ------------------------------------------------------------------ nvidia, failures
    "nvidia/failure-no-devices-were-found.txt": Capture(
        "nvidia-smi", "nvidia", rc=6, reason="no_devices", msg_has=("No devices were found",),
        note="exit status not shown in the thread; 6 is nvidia-smi(1)'s 'a query to find an object was "
             "unsuccessful'"),
    "nvidia/failure-nvml-driver-library-version-mismatch.txt": Capture(
        "nvidia-smi", "nvidia", rc=18, reason="nvml_error", msg_has=("535.161", "reboot", "exit status 18")),
    "nvidia/failure-nvml-no-supported-gpus.txt": Capture(
        "nvidia-smi", "nvidia", rc=255, reason="nvml_error", msg_has=("No supported GPUs",)),
    "nvidia/failure-option-missing-value-topo-m-windows-591.86.txt": Capture(
        "nvidia-smi topo -m", "nvidia", rc=255, reason="invalid_arguments",
        msg_has=("Option -m is missing its value", "--query-gpu=")),
    # ------------------------------------------------------------------ nvidia, outputs hwledger does not read
    # Each must fail saying what it is and what to run instead (a --query-gpu CSV), never be half-read.
    "nvidia/table-default-1xH200-linux-580.159.04-idle.txt": Capture(
        "nvidia-smi", "nvidia", reason="unparseable", msg_has=("human-readable table", "--query-gpu=")),
    "nvidia/table-default-1xH200-linux-580.159.04-load.txt": Capture(
        "nvidia-smi", "nvidia", reason="unparseable", msg_has=("human-readable table", "--query-gpu=")),
    "nvidia/q-text-1xH200-linux-580.159.04-idle.txt": Capture(
        "nvidia-smi -q", "nvidia", reason="unparseable", msg_has=("nvidia-smi -q", "--query-gpu=")),
    "nvidia/q-x-xml-1xH200-linux-580.159.04-idle.xml": Capture(
        "nvidia-smi -q -x", "nvidia", reason="unparseable", msg_has=("XML report", "--query-gpu=")),
    "nvidia/q-x-xml-1xH200-linux-580.159.04-load.xml": Capture(
        "nvidia-smi -q -x", "nvidia", reason="unparseable", msg_has=("XML report", "--query-gpu=")),
    "nvidia/dmon-c2-1xH200-linux-580.159.04-load.txt": Capture(
        "nvidia-smi dmon -c 2", "nvidia", reason="unparseable", msg_has=("nvidia-smi dmon", "--query-gpu=")),
    "nvidia/failure-sh-command-not-found.txt": Capture(
        "nvidia-smi", "nvidia", rc=127, stream="stderr", reason="tool_not_found", msg_has=("nvidia-smi", "PATH"),
        note="exit status not shown in the thread; 127 is what sh returns for a command it cannot find"),
    # ------------------------------------------------------------------ amd-smi
    "rocm/amdsmi-metric-power-json-1xGPU.json": Capture(
        "amd-smi metric -p --json", "amdsmi",
        (Gpu(0, None, None, None, None, power=10.0,
             fields={"power.socket_power": "10 W", "power.gfx_voltage": "6 mV",
                     "power.throttle_status": "UNTHROTTLED"}),)),
    "rocm/amdsmi-monitor-ptumv-table-8xGPU-196300MB.txt": Capture(
        "amd-smi monitor -ptumv", "amdsmi", (
            _mi300_row(0, 171.0, 32, 283), _mi300_row(1, 175.0, 33, 283), _mi300_row(2, 177.0, 31, 283),
            _mi300_row(3, 172.0, 33, 283), _mi300_row(4, 178.0, 32, 284), _mi300_row(5, 176.0, 33, 283),
            _mi300_row(6, 176.0, 32, 283), _mi300_row(7, 175.0, 34, 283),
        )),
    # ------------------------------------------------------------------ rocm-smi CSV
    "rocm/csv-i-P-t-f-u-showmemuse-showmeminfo-vram-showproductname-RX7900XTX-rocm7.2.3-TRUNCATED-3of4.txt": Capture(
        "rocm-smi -i -P -t -f -u --showmemuse --showmeminfo vram --showproductname --csv", "rocm", tuple(
            Gpu(card, "Radeon RX 7900 XTX", 25753026560, 27947008, 25753026560 - 27947008, util=0, temp=temp,
                power=power, fields={"GFX Version": "gfx1100", "Memory Activity": None})
            for card, temp, power in ((0, 31.0, 19.0), (1, 27.0, 18.0), (2, 28.0, 19.0))),
        note="the source kept only the first 3 complete rows; they parse as 3 GPUs"),
    "rocm/csv-showdriverversion-cardsystem-rocm-2022.txt": Capture(
        "rocm-smi --showdriverversion --csv", "rocm", reason="unparseable", msg_has=("no per-GPU values",)),
    "rocm/csv-showproductname-2xMI100-lowercase-card-series.txt": Capture(
        "rocm-smi --showproductname --csv", "rocm", tuple(
            Gpu(card, "Arcturus GL-XL [AMD Instinct MI100]", None, None, None,
                fields={"Card vendor": "Advanced Micro Devices Inc. [AMD/ATI]", "Card SKU": "D34316"})
            for card in (0, 1))),
    # ------------------------------------------------------------------ rocm-smi JSON
    "rocm/json-pretty-showmemuse-2xRX6800-rocmsmi-1.4.1.json": Capture(
        "rocm-smi --json --showmemuse", "rocm", tuple(
            Gpu(card, None, None, None, None, fields={"GPU memory use (%)": "0", "Memory Activity": None})
            for card in (0, 1))),
    "rocm/json-pretty-showproductname-1xMI250X.json": Capture(
        "rocm-smi --showproductname --json", "rocm",
        (Gpu(0, "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2", None, None, None,
             fields={"Card Model": "0x7408", "Card Vendor": "Advanced Micro Devices, Inc. [AMD/ATI]"}),),
        note="the poster ran '<various args> --showproductname --json'; only the product keys are in the file"),
    "rocm/json-pretty-telegraf-allinfo-1xMI50-Vega20-2021.json": Capture(
        TELEGRAF_CMD, "rocm",
        (Gpu(0, "Radeon Instinct MI50 32GB", 34342961152, 10850304, 34342961152 - 10850304, util=0, temp=36.0,
             power=26.0, uuid="0x2f048617326b1ea", fields={"GPU ID": "0x66a1"}),)),
    "rocm/json-pretty-telegraf-allinfo-1xRX6700XT-rocm4.3.0.json": Capture(
        TELEGRAF_CMD, "rocm",
        (Gpu(0, None, 12868124672, 1622728704, 12868124672 - 1622728704, util=0, temp=45.0, power=6.0,
             fields={"Card series": "0x1002", "Unique ID": None,
                     "Temperature (Sensor HBM 0) (C)": None}),),
        note="ROCm 4.3.0 printed the vendor id 0x1002 as the card series: not a name, so name is null"),
    "rocm/json-pretty-telegraf-allinfo-1xRX6700XT-rocm5.7.1.json": Capture(
        TELEGRAF_CMD, "rocm",
        (Gpu(0, RX6700XT, 12868124672, 1564491776, 12868124672 - 1564491776, util=0, temp=45.0, power=6.0,
             fields={"GPU ID": "0x73df"}),)),
    "rocm/json-pretty-telegraf-allinfo-1xRX6700XT-rocm6.0.2.json": Capture(
        TELEGRAF_CMD, "rocm",
        (Gpu(0, RX6700XT, 12868124672, 1572757504, 12868124672 - 1572757504, util=0, temp=45.0, power=None,
             fields={"Device ID": "0x73df", "Average Graphics Package Power (W)": None}),),
        note="Average Graphics Package Power is 'N/A (Secondary die)' in this file"),
    "rocm/json-pretty-telegraf-allinfo-1xRX6700XT-rocm6.1.2.json": Capture(
        TELEGRAF_CMD, "rocm",
        (Gpu(0, RX6700XT, 12868124672, 1572745216, 12868124672 - 1572745216, util=0, temp=45.0, power=6.0,
             fields={"Device Name": RX6700XT, "GPU Memory Allocated (VRAM%)": "12", "0": "2.5GT/s x1"}),)),
    "rocm/json-pretty-telegraf-allinfo-1xVega10XT-2021.json": Capture(
        TELEGRAF_CMD, "rocm",
        (Gpu(0, None, 17163091968, 17776640, 17163091968 - 17776640, util=0, temp=39.0, power=15.0,
             uuid="0x2150e7d042a1124", fields={"GPU ID": "0x6861"}),),
        note="no card series in this file, only 'Card model': '0xc1e'"),
    "rocm/json-pretty-telegraf-allinfo-4xMI100-rocm6.0.2.json": Capture(
        TELEGRAF_CMD, "rocm", (
            _mi100(0, "0x79ccd55167a2124a", 53.0, 36.0, 6750208),
            _mi100(1, "0x4edfb117a17a07d", 55.0, 44.0, 6750208),
            _mi100(2, "0xd4a9ec48d03d261d", 54.0, 43.0, 6750208),
            _mi100(3, "0x1b9dd972253c3736", 51.0, 39.0, 6750208),
        )),
    "rocm/json-pretty-telegraf-allinfo-6xMI100-rocm5.7.1.json": Capture(
        TELEGRAF_CMD, "rocm", (
            _mi100(0, None, 31.0, 39.0, 6782976), _mi100(1, None, 30.0, 37.0, 6782976),
            _mi100(2, None, 31.0, 35.0, 6782976), _mi100(3, None, 33.0, 39.0, 6782976),
            _mi100(4, None, 32.0, 39.0, 6782976), _mi100(5, None, 33.0, 40.0, 6782976),
        )),
    # ------------------------------------------------------------------ rocm-smi plain tables (TextFSM)
    "rocm/table-showmeminfo-vram-1xGPU.txt": Capture(
        "rocm-smi --showmeminfo vram", "rocm",
        (Gpu(0, None, 4278190080, 108814336, 4278190080 - 108814336),)),
    "rocm/table-showpower-fragment-3xGPU-rocm6.0-mixed-power-keys.txt": Capture(
        "rocm-smi --showpower", "rocm", (
            Gpu(0, None, None, None, None, power=None, fields={"Average Graphics Package Power (W)": None}),
            Gpu(1, None, None, None, None, power=4.0,
                fields={"Current Socket Graphics Package Power (W)": "4.0"}),
            Gpu(2, None, None, None, None, power=3.0,
                fields={"Current Socket Graphics Package Power (W)": "3.0"}),
        )),
}
