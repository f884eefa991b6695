"""VoCoPretrain: self-supervised pre-training runs (VoCo, PUMIT tokenizer, PUMIT MIM) from Slicer.

Thin Slicer module: runs are detached ``PythonSlicer -m vocoslicer pretrain ...`` child processes with their own
run directory, so they survive a Slicer restart and can be reattached, stopped and resumed from here.
"""

import logging
import pathlib
from typing import Annotated

import ctk
import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from VoCoSlicerLib import plots
from VoCoSlicerLib.engine import python_executable
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.job_runs import list_runs, new_run_dir
from VoCoSlicerLib.params import MODEL_SIZES, PRETRAIN_METHODS, PretrainParams, from_parameter_node
from VoCoSlicerLib.state import JobState

PYTHON_SETTING = "VoCoSlicer/PythonExecutable"  # written by the VoCoSlicer set-up module
PARAMETERS_SET_BY_CODE = ("dataDirs",)  # a folder list has no standard binding: dataDirsListWidget writes it


class VoCoPretrain(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCo Pretrain")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["VoCoSlicer"]
        self.parent.contributors = ["VoCoSlicer contributors"]
        self.parent.helpText = _("Self-supervised pre-training on your own unlabelled CT folders: VoCo volume "
                                 "contrast, PUMIT tokenizer or PUMIT masked image modelling, on one or several GPUs. "
                                 "Runs continue in the background and can be reattached after a restart.")
        self.parent.acknowledgementText = _("VoCo (Wu et al.) and PUMIT (Luo et al.) pre-training methods.")


@parameterNodeWrapper
class VoCoPretrainParameterNode:
    """What the panel edits; mirrors VoCoSlicerLib.params.PretrainParams field by field."""

    method: Annotated[str, Choice(list(PRETRAIN_METHODS))] = "voco"
    dataDirs: list[str]
    modelSize: Annotated[str, Choice(list(MODEL_SIZES))] = "B"
    gpus: Annotated[int, WithinRange(1, 64)] = 1
    steps: Annotated[int, WithinRange(1, 10000000)] = 1000
    batchSize: Annotated[int, WithinRange(1, 1024)] = 2
    cropSize: Annotated[int, WithinRange(32, 512)] = 96
    outputDir: pathlib.Path
    initCheckpoint: pathlib.Path


class VoCoPretrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: settings, launch/stop/resume/reattach, live curves, throughput, log."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._chart = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoPretrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VoCoPretrainLogic()
        self.driver = JobDriver(_("Launch"), on_finished=self._onFinished)
        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self._onTimer)
        self.ui.outputDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.addDataDirButton.connect("clicked(bool)", self.onAddDataDir)
        self.ui.removeDataDirButton.connect("clicked(bool)", self.onRemoveDataDir)
        self.ui.launchButton.connect("clicked(bool)", self.onLaunch)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.reattachButton.connect("clicked(bool)", self.onReattach)
        self.ui.copyTorchrunButton.connect("clicked(bool)", self.onCopyTorchrun)
        self.initializeParameterNode()
        self._refreshRuns()
        self._updateGUI()

    def cleanup(self):
        self.removeObservers()
        self._timer.stop()  # the run itself is detached: it keeps going and can be reattached

    def enter(self):
        self.initializeParameterNode()
        self._refreshRuns()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        import VoCoSlicerLib

        VoCoSlicerLib.reload_package()
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.ui.dataDirsListWidget.clear()
            for folder in self._parameterNode.dataDirs:
                self.ui.dataDirsListWidget.addItem(folder)

    def _python(self):
        return python_executable(str(qt.QSettings().value(PYTHON_SETTING, "") or ""))

    def _params(self):
        return from_parameter_node(PretrainParams, self._parameterNode)

    # ------------------------------------------------------------------ data folders
    def onAddDataDir(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder of unlabelled volumes"))
        if folder and folder not in self._parameterNode.dataDirs:
            self._parameterNode.dataDirs = [*self._parameterNode.dataDirs, folder]
            self.ui.dataDirsListWidget.addItem(folder)

    def onRemoveDataDir(self):
        row = self.ui.dataDirsListWidget.currentRow
        if row >= 0:
            dirs = list(self._parameterNode.dataDirs)
            del dirs[row]
            self._parameterNode.dataDirs = dirs
            self.ui.dataDirsListWidget.takeItem(row)

    # ------------------------------------------------------------------ runs
    def onLaunch(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to launch pre-training."), waitCursor=True):
            params = self._params()
            runDir = new_run_dir(f"pretrain-{params.method}")
            self.driver.start([params.args()], run_dir=runDir, detached=True, python=self._python())
            self._follow()

    def onStop(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to stop the run.")):
            self.driver.cancel()
            self._updateGUI()

    def _selectedRun(self):
        runDir = self.ui.runsComboBox.itemData(self.ui.runsComboBox.currentIndex)
        if not runDir:
            raise ValueError(_("Select a previous run first."))
        return runDir

    def onResume(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the run."), waitCursor=True):
            self.driver.python = self._python()
            self.driver.resume(self._selectedRun(), detached=True)
            self._follow()

    def onReattach(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to reattach to the run."), waitCursor=True):
            self.driver.attach(self._selectedRun())
            self._follow()

    def onCopyTorchrun(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to build the torchrun command.")):
            command = self._params().torchrun_command()
            qt.QApplication.clipboard().setText(command)
            self.driver.log.append(f"copied: {command}")
            self._updateGUI()

    def _follow(self):
        self._chart = plots.new_chart(slicer.mrmlScene, _("Pre-training"))
        slicer.modules.plots.logic().ShowChartInLayout(self._chart)
        self._timer.start()
        self._updateGUI()

    def _refreshRuns(self):
        combo = self.ui.runsComboBox
        combo.clear()
        for run in list_runs():
            if str(run.get("command", "")).startswith("pretrain"):
                combo.addItem(f"{pathlib.Path(run['run_dir']).name}  ({run.get('status', '?')})", run["run_dir"])

    def _onTimer(self):
        with slicer.util.tryWithErrorDisplay(_("Run monitoring failed.")):
            self.driver.tick()
            if self._chart is not None and self.driver.metrics.names():
                plots.update_chart(slicer.mrmlScene, self._chart, self.driver.metrics)
        if not self.driver.busy:
            self._timer.stop()
        self._updateGUI()

    def _onFinished(self, driver):
        logging.info(f"pre-training run {driver.run_dir} ended: {driver.state.state.value} {driver.state.message}")
        self._refreshRuns()

    def _updateGUI(self):
        view = self.driver.state.view()
        busy = self.driver.busy
        self.ui.launchButton.enabled = not busy
        self.ui.resumeButton.enabled = not busy and self.ui.runsComboBox.count > 0
        self.ui.reattachButton.enabled = not busy and self.ui.runsComboBox.count > 0
        self.ui.stopButton.enabled = self.driver.state.state is JobState.RUNNING
        self.ui.progressBar.visible = view.progress_visible
        self.ui.progressBar.maximum = 0 if view.progress_percent < 0 else 100
        self.ui.progressBar.value = max(view.progress_percent, 0)
        self.ui.statusLabel.text = view.progress_text
        self.ui.throughputLabel.text = self.driver.throughput.text()
        self.ui.logTextEdit.setPlainText(self.driver.log_text())


class VoCoPretrainLogic(ScriptedLoadableModuleLogic):
    """Parameter node only; the run is driven by VoCoSlicerLib.job_driver."""

    def getParameterNode(self):
        return VoCoPretrainParameterNode(super().getParameterNode())


class VoCoPretrainTest(ScriptedLoadableModuleTest):
    """In-app test: a few steps of the smallest PUMIT tokenizer on phantoms, then reattach to the finished run."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_tiny_run_and_reattach()

    def _wait(self, driver, timeout=600):
        import time

        deadline = time.time() + timeout
        while driver.busy and time.time() < deadline:
            driver.tick()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertFalse(driver.busy, "run timed out")

    def test_tiny_run_and_reattach(self):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            self.delayDisplay("PyTorch is not installed (installs are skipped in testing mode): test skipped")
            return
        tmp = pathlib.Path(slicer.util.tempDirectory())
        driver = JobDriver("test")
        driver.start([["phantom", "--seed", "11", "--count", "2", "--size", "48", "48", "24", "-o", str(tmp / "data")]])
        self._wait(driver)
        images = [str(p) for p in sorted((tmp / "data").glob("*_ct.nii.gz"))]  # not the truth label maps
        params = PretrainParams(method="tokenizer", dataDirs=images, modelSize="tiny", steps=4,
                                batchSize=1, cropSize=32, outputDir=str(tmp / "run"))
        driver.start([params.args()], run_dir=tmp / "job", detached=True)
        self._wait(driver)
        self.assertEqual(driver.state.state, JobState.DONE, driver.state.message)
        self.assertTrue(driver.metrics.names(), "the run reported no metrics")
        later = JobDriver("test")
        later.attach(tmp / "job")
        self._wait(later)
        self.assertEqual(later.state.state, JobState.DONE)
        self.delayDisplay("Test passed")
