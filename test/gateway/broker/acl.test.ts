import { describe, expect, it } from 'vitest';
import { configSchema } from '../../../src/config/schema.js';
import {
  anonymousAcl,
  canPublish,
  canReceive,
  canSubscribe,
  defaultDeviceAcl,
  deviceAcl,
  filterCovers,
  filtersIntersect,
  sameAcl,
  type EffectiveAcl,
} from '../../../src/gateway/broker/acl.js';

const own = defaultDeviceAcl('a', 'gw1');

describe('acl', () => {
  it('gives a device publish and subscribe under devices/<id>/# and the gateway status by default', () => {
    expect(canPublish(own, 'devices/a/telemetry')).toBe(true);
    expect(canPublish(own, 'devices/a')).toBe(true);
    expect(canPublish(own, 'devices/b/telemetry')).toBe(false);
    expect(canPublish(own, 'devices/ab/telemetry')).toBe(false);
    expect(canPublish(own, 'gateway/gw1/status')).toBe(false);
    expect(canSubscribe(own, 'gateway/gw1/status')).toBe(true);
    expect(canSubscribe(own, 'gateway/gw2/status')).toBe(false);
  });

  it('allows a subscription only when one allowed filter covers every topic it can match', () => {
    expect(canSubscribe(own, 'devices/a/#')).toBe(true);
    expect(canSubscribe(own, 'devices/a/x/+')).toBe(true);
    expect(canSubscribe(own, 'devices/a/+/y/#')).toBe(true);
    expect(canSubscribe(own, 'devices/+/telemetry')).toBe(false);
    expect(canSubscribe(own, 'devices/#')).toBe(false);
    expect(canSubscribe(own, '#')).toBe(false);
    expect(canSubscribe(own, '+/a/#')).toBe(false);
    expect(canSubscribe(own, 'devices/b/#')).toBe(false);
  });

  it('closes every $ topic, whatever the lists say', () => {
    const everything: EffectiveAcl = { publish: ['#', '$SYS/#'], subscribe: ['#', '$SYS/#'], deny: [] };
    expect(canPublish(everything, '$SYS/x/new/clients')).toBe(false);
    expect(canPublish(everything, '$share/g/t')).toBe(false);
    expect(canSubscribe(everything, '$SYS/#')).toBe(false);
    expect(canSubscribe(everything, '$SYS/+/new/subscribes')).toBe(false);
    expect(canReceive(everything, '$SYS/gw/heartbeat')).toBe(false);
    expect(canSubscribe(everything, '#')).toBe(true);
  });

  it('lets deny win over allow for publish, subscribe and delivery', () => {
    const acl: EffectiveAcl = {
      publish: ['devices/a/#'],
      subscribe: ['devices/#'],
      deny: ['devices/a/secret/#', 'devices/b/#'],
    };
    expect(canPublish(acl, 'devices/a/x')).toBe(true);
    expect(canPublish(acl, 'devices/a/secret/k')).toBe(false);
    expect(canPublish(acl, 'devices/a/secret')).toBe(false);
    expect(canSubscribe(acl, 'devices/c/#')).toBe(true);
    // A filter wholly inside the deny list is refused …
    expect(canSubscribe(acl, 'devices/b/#')).toBe(false);
    expect(canSubscribe(acl, 'devices/b/telemetry')).toBe(false);
    expect(canSubscribe(acl, 'devices/a/secret/+')).toBe(false);
    // … one that only reaches into it is granted, and its denied messages are never delivered.
    expect(canSubscribe(acl, 'devices/#')).toBe(true);
    expect(canSubscribe(acl, 'devices/+/telemetry')).toBe(true);
    expect(canReceive(acl, 'devices/c/telemetry')).toBe(true);
    expect(canReceive(acl, 'devices/b/telemetry')).toBe(false);
    expect(canReceive(acl, 'devices/a/secret/k')).toBe(false);
  });

  it('refuses wildcards, empty and over-deep topics in publishes and malformed filters', () => {
    const all: EffectiveAcl = { publish: ['#'], subscribe: ['#'], deny: [] };
    expect(canPublish(all, 'a/+')).toBe(false);
    expect(canPublish(all, 'a/#')).toBe(false);
    expect(canPublish(all, '')).toBe(false);
    expect(canPublish(all, Array.from({ length: 101 }, () => 'x').join('/'))).toBe(false);
    expect(canPublish(all, Array.from({ length: 100 }, () => 'x').join('/'))).toBe(true);
    expect(canSubscribe(all, 'a/#/b')).toBe(false);
    expect(canSubscribe(all, 'a/b+')).toBe(false);
    expect(canSubscribe(all, '')).toBe(false);
    // U+0000, and U+FFFD (ill-formed UTF-8 after decoding), in topics and in filters.
    for (const odd of ['a/\u0000', 'a/\uFFFD/b']) {
      expect(canPublish(all, odd)).toBe(false);
      expect(canSubscribe(all, odd)).toBe(false);
      expect(canSubscribe(all, `${odd}/#`)).toBe(false);
    }
    expect(canPublish(all, 'a/\u00e9t\u00e9/\u{1F321}')).toBe(true);
  });

  it('decides filter coverage level by level', () => {
    expect(filterCovers('devices/a/#', 'devices/a')).toBe(true);
    expect(filterCovers('devices/a/#', 'devices/a/x/+')).toBe(true);
    expect(filterCovers('devices/+/t', 'devices/a/t')).toBe(true);
    expect(filterCovers('devices/+/t', 'devices/+/t')).toBe(true);
    expect(filterCovers('devices/a/t', 'devices/+/t')).toBe(false);
    expect(filterCovers('devices/+/t', 'devices/a/#')).toBe(false);
    expect(filterCovers('devices/+/#', 'devices/#')).toBe(false);
    expect(filterCovers('a/+', 'a')).toBe(false);
    expect(filterCovers('#', '$SYS/x')).toBe(false);
  });

  it('decides whether two filters share a topic', () => {
    expect(filtersIntersect('devices/+/t', 'devices/a/#')).toBe(true);
    expect(filtersIntersect('a', 'a/#')).toBe(true);
    expect(filtersIntersect('a/+', 'a')).toBe(false);
    expect(filtersIntersect('a/b', 'a/c')).toBe(false);
    expect(filtersIntersect('#', '$SYS/#')).toBe(false);
  });

  it('builds effective ACLs from config: explicit, default and anonymous', () => {
    const broker = configSchema.parse({
      gateway: { id: 'gw1' },
      broker: {
        allowAnonymous: false,
        anonymousAcl: { publish: ['public/#'] },
        devices: [
          { id: 'a', passwordHash: '$scrypt$x' },
          { id: 'b', passwordHash: '$scrypt$x', acl: { publish: ['devices/b/telemetry'] } },
        ],
      },
    }).broker;
    expect(sameAcl(deviceAcl(broker.devices[0]!, 'gw1'), own)).toBe(true);
    expect(deviceAcl(broker.devices[1]!, 'gw1')).toEqual({
      publish: ['devices/b/telemetry'],
      subscribe: [],
      deny: [],
    });
    // Anonymous gets nothing while allowAnonymous is off, even with an anonymousAcl written.
    expect(canPublish(anonymousAcl(broker), 'public/x')).toBe(false);
    expect(canPublish(anonymousAcl({ ...broker, allowAnonymous: true }), 'public/x')).toBe(true);
  });
});
