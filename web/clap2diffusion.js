// CLAP2Diffusion frontend glue (ComfyUI frontend 1.x).
//
// Load Audio (CLAP2Diffusion) and CLAP Encode File ask for an upload button (`audio_upload` on
// their `audio` combo). The frontend's upload widget expects an audio player widget ("audioUI") on
// the node, but adds that player only to core node types (LoadAudio, SaveAudio, PreviewAudio, ...):
// without it the node cannot even be created. Give our nodes the same player, right after the file
// combo, so it plays the chosen file and, after a run, the sound the node loaded.
import { app } from "../../scripts/app.js";

const AUDIO_NODES = new Set(["C2D_LoadAudio", "C2D_ClapEncodeFile"]);

app.registerExtension({
  name: "clap2diffusion.LoadAudioPlayer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!AUDIO_NODES.has(nodeData?.name)) return;
    const required = nodeData.input?.required;
    if (!required || !("audio" in required) || "audioUI" in required) return;
    // The player goes right after the file combo (the upload button looks it up when it is
    // created); every other input keeps its place, so link slots match the server's order.
    const ordered = {};
    for (const [name, spec] of Object.entries(required)) {
      ordered[name] = spec;
      if (name === "audio") ordered.audioUI = ["AUDIO_UI", {}];
    }
    nodeData.input.required = ordered;
  },
});
