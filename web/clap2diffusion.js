// CLAP2Diffusion frontend glue (ComfyUI frontend 1.x).
//
// Load Audio (CLAP2Diffusion) asks for an upload button (`audio_upload`). The frontend's upload
// widget expects an audio player widget ("audioUI") on the node, but adds that player only to
// core node types (LoadAudio, SaveAudio, PreviewAudio, ...): without it the node cannot even be
// created. Give our node the same player, before the upload button, so it plays the chosen file
// and, after a run, the sound the node loaded.
import { app } from "../../scripts/app.js";

const AUDIO_NODES = new Set(["C2D_LoadAudio"]);

app.registerExtension({
  name: "clap2diffusion.LoadAudioPlayer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!AUDIO_NODES.has(nodeData?.name)) return;
    const required = nodeData.input?.required;
    if (!required || "audioUI" in required) return;
    // Keep the file combo first, then the player, then the upload button (which looks the player
    // up when it is created), then anything else.
    const { audio, upload, ...rest } = required;
    nodeData.input.required = {
      ...(audio ? { audio } : {}),
      audioUI: ["AUDIO_UI", {}],
      ...(upload ? { upload } : {}),
      ...rest,
    };
  },
});
