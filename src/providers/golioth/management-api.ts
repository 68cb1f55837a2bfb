import type { HttpClient } from '../http-client.js';

/**
 * The Golioth management API calls the provider makes (§3.1): project lookup, the device list
 * (every page, optionally with each device's LightDB State at a path), a device's effective
 * settings, and LightDB State writes.
 */

export interface GoliothProject {
  id: string;
  name: string;
  organizationId?: string;
}

export interface GoliothDevice {
  id: string;
  name: string;
  hardwareIds: string[];
  blueprintId?: string;
  enabled?: boolean;
  /** LightDB State at the requested statePath, when one was asked for. */
  data?: unknown;
}

export interface GoliothSetting {
  key: string;
  value: unknown;
  dataType: string;
  deviceId?: string;
  blueprintId?: string;
}

interface Page<T> {
  list?: T[];
  page?: number;
  perPage?: number;
  total?: number;
}

export interface ManagementApi {
  getProject(signal?: AbortSignal): Promise<GoliothProject>;
  listDevices(options: {
    statePath?: string;
    signal?: AbortSignal;
  }): Promise<{ devices: GoliothDevice[]; pages: number }>;
  deviceSettings(deviceId: string, signal?: AbortSignal): Promise<GoliothSetting[]>;
  writeState(deviceId: string, path: string, value: unknown, signal?: AbortSignal): Promise<void>;
}

const PER_PAGE = 100;
/** Stops a list that never ends (a server that ignores `page`). */
const MAX_PAGES = 10_000;

export function createManagementApi(http: HttpClient, projectId: string): ManagementApi {
  const project = `/v1/projects/${encodeURIComponent(projectId)}`;
  return {
    async getProject(signal) {
      const res = await http.request<{ data?: GoliothProject }>({
        method: 'GET',
        path: project,
        operation: 'golioth_get_project',
        signal,
      });
      return res.body.data ?? { id: projectId, name: projectId };
    },
    async listDevices({ statePath, signal }) {
      const devices: GoliothDevice[] = [];
      let pages = 0;
      for (let page = 0; page < MAX_PAGES; page++) {
        const res = await http.request<Page<GoliothDevice>>({
          method: 'GET',
          path: `${project}/devices`,
          query: { page, perPage: PER_PAGE, statePath },
          operation: 'golioth_list_devices',
          signal,
        });
        pages++;
        const list = res.body.list ?? [];
        devices.push(...list);
        const total = res.body.total ?? 0;
        if (list.length === 0 || devices.length >= total) break;
      }
      return { devices, pages };
    },
    async deviceSettings(deviceId, signal) {
      const res = await http.request<Page<GoliothSetting>>({
        method: 'GET',
        path: `${project}/devices/${encodeURIComponent(deviceId)}/settings`,
        operation: 'golioth_device_settings',
        signal,
      });
      return res.body.list ?? [];
    },
    async writeState(deviceId, path, value, signal) {
      // The official Python client writes LightDB State with POST (§3.1). Writing the same
      // value at the same path twice leaves the same state, so a retry is safe.
      await http.request({
        method: 'POST',
        path: `${project}/devices/${encodeURIComponent(deviceId)}/data/${path}`,
        body: value,
        operation: 'golioth_write_state',
        retry: true,
        signal,
      });
    },
  };
}
