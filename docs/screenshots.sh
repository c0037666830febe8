#!/usr/bin/env bash
# Screenshots of MLflow's UI for docs/: the pre-training experiment in model-training mode (its metric charts), a
# run's mask heatmap and its importance-by-distance plot, taken in headless Chromium from a short demo run.
#
#   docs/screenshots.sh [WORK_DIR]
#
# WORK_DIR holds the demo run and its sqlite MLflow store (a new temporary directory by default; one that already
# has mlflow.db is reused as it is). Tools for these pictures, not dependencies of the project: Debian's Chromium
# (apt-get install -y chromium), Node.js, and playwright-core from npm (installed in TOOLS, default
# ~/.cache/sparsebert/screenshot-tools). PORT (default 5055) is where the MLflow server listens meanwhile.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)
port=${PORT:-5055}
uri="sqlite:///$work/mlflow.db"
tools=${TOOLS:-$HOME/.cache/sparsebert/screenshot-tools}
command -v chromium >/dev/null || { echo "error: chromium not found (apt-get install -y chromium)" >&2; exit 2; }
[ -d "$tools/node_modules/playwright-core" ] || npm install --prefix "$tools" --no-audit --no-fund playwright-core@1

if [ ! -e "$work/mlflow.db" ]; then
  # The demo, shortened: 80 DAM search steps, so the frozen mask has a shape worth looking at, then 20 more.
  (cd "$work" && python "$repo/sparsebert/pretrain.py" train.max_steps=100 dam.search_steps=80 \
    output_dir="$work/run" mlflow.tracking_uri="$uri")
fi

# One worker: the UI needs no more, and it starts quickly on a loaded machine.
mlflow server --backend-store-uri "$uri" --host 127.0.0.1 --port "$port" --workers 1 >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
until curl -sf -o /dev/null "http://127.0.0.1:$port/health"; do
  kill -0 "$server" 2>/dev/null || { echo "error: mlflow server failed, see $work/server.log" >&2; exit 1; }
  sleep 1
done

read -r experiment run < <(python - "$uri" <<'PY'
import sys

from mlflow import MlflowClient

client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("sparsebert-pretrain").experiment_id
run = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)[0]
print(experiment, run.info.run_id)
PY
)

# MLflow 3.17's UI opens in its GenAI mode unless told otherwise (its sidebar switch, kept in the browser's local
# storage, or workflowType in the URL) and opens its assistant panel on a first visit: both are set as a user
# would leave them. Each page is taken once the single-page app has rendered what it shows.
base="http://127.0.0.1:$port/#/experiments/$experiment"
artifacts="$base/runs/$run/artifacts/masks/stage1_frozen"
NODE_PATH="$tools/node_modules" node - "$repo/docs" "$base/runs?compareRunsMode=CHART" \
  "$artifacts/mask_layer0.png" "$artifacts/importance_by_distance.png" <<'JS'
const { chromium } = require("playwright-core");
const [docs, charts, heatmap, importance] = process.argv.slice(2);

async function shot(context, url, ready, file) {
  const page = await context.newPage(); // a fresh load each time, so nothing of the last page is taken for this one
  await page.goto(url);
  await ready(page);
  await page.waitForTimeout(2000); // charts and images settle after their data arrives
  await page.screenshot({ path: `${docs}/${file}` });
  await page.close();
}

const lossCharts = async (page) => { // the training and held-out loss curves, charts drawn
  await page.getByPlaceholder("Search metric charts").fill("loss");
  await page.waitForFunction(() => document.querySelectorAll(".js-plotly-plot").length >= 3);
};

const loadedImage = (page) =>
  page.waitForFunction(() => [...document.images].some((img) => img.complete && img.naturalWidth > 500));

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  context.setDefaultTimeout(120000);
  await context.addInitScript(() => {
    localStorage.setItem("mlflow.workflowType_v1", JSON.stringify("machine_learning"));
    localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
    localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
  });
  await shot(context, charts, lossCharts, "mlflow_experiments.png");
  await shot(context, heatmap, loadedImage, "mlflow_mask_heatmap.png");
  await shot(context, importance, loadedImage, "mlflow_importance.png");
  await browser.close();
})().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
JS

for png in "$repo"/docs/mlflow_*.png; do  # a 256-colour palette: a third of the size, the same to the eye
  python -c "from PIL import Image; import sys; Image.open(sys.argv[1]).quantize(256).save(sys.argv[1], optimize=True)" "$png"
done
ls -l "$repo"/docs/mlflow_*.png
