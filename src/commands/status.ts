import { daemonUrl, fetchStatus, formatStatus } from '../gateway/http/status-format.js';
import { EXIT_OK, loadForCommand, type CommandIo } from './common.js';

/** `iot-gateway status`: asks the running daemon over HTTP and prints its state for a person. */
export async function statusCommand(io: CommandIo, json: boolean): Promise<number> {
  const { config } = loadForCommand(io);
  const snapshot = await fetchStatus(daemonUrl(config.http.host, config.http.port), 5_000);
  io.out(json ? JSON.stringify(snapshot, null, 2) : formatStatus(snapshot));
  return EXIT_OK;
}
