import { readFileSync } from 'node:fs';
import type { TestPki } from '../../helpers/certs.js';
import { startCoapEndpoint, type CoapEndpoint, type CoapRequestRecord } from './coap-endpoint.js';
import { startRestServer, type RestServer } from './rest-server.js';
import {
  createProject,
  newDevice,
  now,
  objectId,
  setAtPath,
  type SettingDataType,
  type SimDevice,
  type SimProject,
  type SimSetting,
  type SimStreamRow,
} from './store.js';

/**
 * A local Golioth (/work/shared/docs/cloud-protocols.md §3): the management REST API over HTTPS
 * and the device API, CoAP over DTLS-PSK, both on 127.0.0.1. Stream data posted by a device
 * (`POST /.s/<path>`) lands in the project's LightDB Stream, where REST stream queries find it;
 * `PUT|POST /.d/<path>` writes the device's LightDB State.
 */
export interface GoliothSim {
  readonly restUrl: string;
  readonly coapUrl: string;
  readonly rest: RestServer;
  readonly coap: CoapEndpoint;
  addProject(id: string, apiKey: string): SimProject;
  addDevice(
    projectId: string,
    input: {
      name: string;
      hardwareIds?: string[];
      blueprintId?: string;
      psk?: { identity?: string; key: string };
    },
  ): SimDevice;
  /** Writes the identity → PSK table of every project to the CoAP server (restarts it). */
  applyCredentials(): Promise<void>;
  device(projectId: string, name: string): SimDevice;
  setState(projectId: string, name: string, path: string, value: unknown): void;
  addSetting(
    projectId: string,
    input: {
      key: string;
      dataType: SettingDataType;
      value: unknown;
      deviceName?: string;
      blueprintId?: string;
    },
  ): SimSetting;
  stream(projectId: string): readonly SimStreamRow[];
  /** CoAP requests whose identity matched no device (or whose JSON did not parse). */
  readonly coapRejects: CoapRequestRecord[];
  close(): Promise<void>;
}

export async function startGoliothSim(
  pki: TestPki,
  options: { rateLimit?: number } = {},
): Promise<GoliothSim> {
  const projects = new Map<string, SimProject>();
  const rest = await startRestServer({
    projects,
    cert: readFileSync(pki.serverCert),
    key: readFileSync(pki.serverKey),
  });
  const coap = await startCoapEndpoint(options);
  const coapRejects: CoapRequestRecord[] = [];

  const deviceOfIdentity = (identity: string | undefined) => {
    if (identity === undefined) return undefined;
    const projectId = identity.slice(identity.lastIndexOf('@') + 1);
    const project = projects.get(projectId);
    if (project === undefined) return undefined;
    for (const [deviceId, creds] of project.credentials) {
      if (creds.some((c) => c.identity === identity)) {
        const device = project.devices.get(deviceId);
        if (device !== undefined) return { project, device };
      }
    }
    return undefined;
  };

  coap.onRequest((record) => {
    const owner = deviceOfIdentity(record.identity);
    if (owner === undefined) {
      coapRejects.push(record);
      return;
    }
    const { project, device } = owner;
    device.metadata.lastSeenOnline = now();
    let value: unknown;
    try {
      value = JSON.parse(record.payload);
    } catch {
      coapRejects.push(record);
      return;
    }
    if (record.method === 'POST' && record.path.startsWith('/.s')) {
      // [UNCONFIRMED] the stream record nests the posted JSON under the path it was posted to.
      const sub = record.path.slice('/.s'.length);
      project.stream.push({
        deviceId: device.id,
        time: new Date(record.at).toISOString(),
        data: setAtPath({}, sub, value),
      });
    } else if ((record.method === 'POST' || record.method === 'PUT') && record.path.startsWith('/.d')) {
      device.state = setAtPath(device.state, record.path.slice('/.d'.length), value);
      device.metadata.lastReport = now();
    }
  });

  const projectOf = (id: string) => {
    const p = projects.get(id);
    if (p === undefined) throw new Error(`no project ${id} in the simulator`);
    return p;
  };
  const deviceByName = (projectId: string, name: string) => {
    const d = [...projectOf(projectId).devices.values()].find((x) => x.name === name);
    if (d === undefined) throw new Error(`no device ${name} in project ${projectId}`);
    return d;
  };

  return {
    restUrl: rest.url,
    coapUrl: `coaps://127.0.0.1:${coap.port}`,
    rest,
    coap,
    coapRejects,
    addProject(id, apiKey) {
      const project = projects.get(id) ?? createProject(id);
      project.apiKeys.add(apiKey);
      projects.set(id, project);
      return project;
    },
    addDevice(projectId, input) {
      const project = projectOf(projectId);
      const device = newDevice(input);
      project.devices.set(device.id, device);
      if (input.psk !== undefined) {
        project.credentials.set(device.id, [
          {
            id: objectId(),
            type: 'PRE_SHARED_KEY',
            identity: input.psk.identity ?? `${input.name}@${projectId}`,
            preSharedKey: input.psk.key,
            createdAt: now(),
          },
        ]);
      }
      return device;
    },
    async applyCredentials() {
      const table = new Map<string, string>();
      for (const p of projects.values()) {
        for (const creds of p.credentials.values())
          for (const c of creds) table.set(c.identity, c.preSharedKey);
      }
      await coap.setCredentials(table);
    },
    device: deviceByName,
    setState(projectId, name, path, value) {
      const device = deviceByName(projectId, name);
      device.state = setAtPath(device.state, path, value);
    },
    addSetting(projectId, input) {
      const project = projectOf(projectId);
      const t = now();
      const setting: SimSetting = {
        id: objectId(),
        key: input.key,
        value: input.value,
        dataType: input.dataType,
        projectId,
        blueprintId: input.blueprintId ?? '',
        deviceId: input.deviceName === undefined ? '' : deviceByName(projectId, input.deviceName).id,
        createdAt: t,
        updatedAt: t,
      };
      project.settings.set(setting.id, setting);
      return setting;
    },
    stream(projectId) {
      return projectOf(projectId).stream;
    },
    async close() {
      await Promise.allSettled([rest.close(), coap.close()]);
    },
  };
}
